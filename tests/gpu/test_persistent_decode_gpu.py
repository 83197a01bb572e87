"""The batch-1 decode step as one persistent launch (kernels/persistent_decode.py) against the
per-op kernels on the same weights: logits, the KV cache it writes, graph against eager."""
import pytest
import torch

from bench.random_model import random_state_dict
from graph.config import LlamaConfig
from graph.llama import LlamaModel
from runtime import persistent_decode as pd
from runtime.engine import Engine, make_decode_graphs, make_engine
from runtime.kv_cache import PagedKVCache
from runtime.sampler import SamplingParams

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HOPPER, reason="needs a Hopper or newer CUDA GPU")]


@pytest.fixture(autouse=True)
def persistent_on(monkeypatch):
    # on by default; set here so that an A/B setting in the environment does not turn it off
    monkeypatch.setenv("LLAMA_TRITON_PERSISTENT", "1")


# two head sizes (the 1B's 64 and the 8B's 128), GQA, a vocabulary of many row blocks
CONFIGS = {
    "d64": LlamaConfig(vocab_size=16384, hidden_size=512, intermediate_size=1536,
                       num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                       head_dim=64, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       rope_theta=500000.0, tie_word_embeddings=True),
    "d128": LlamaConfig(vocab_size=16384, hidden_size=1024, intermediate_size=2048,
                        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        rope_theta=10000.0, tie_word_embeddings=False),
    # a long intermediate row: w2's input is packed, which leaves room for a deeper ring
    "wide": LlamaConfig(vocab_size=16384, hidden_size=1024, intermediate_size=14336,
                        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=128, max_position_embeddings=4096, rms_norm_eps=1e-5,
                        rope_theta=10000.0, tie_word_embeddings=False),
}


def _state(config, dtype):
    state = random_state_dict(config, "cuda", dtype, seed=1)
    gen = torch.Generator(device="cuda").manual_seed(2)
    for name, w in state.items():
        if name.endswith("norm.weight"):  # not all ones, so the norms' weights are checked
            w.add_(torch.randn(w.shape, device="cuda", generator=gen).to(dtype) * 0.2)
    return state


def _engine(config, state, dtype, persistent, graphs, any_length=True):
    """any_length: the persistent step decodes past its longest_context too, where the engine
    would hand such sequences to the per-op kernels, so that the kernel is checked there."""
    devices = [torch.device("cuda", 0)] * config.num_hidden_layers
    model = LlamaModel(config, state, devices, dtype)
    cache = PagedKVCache(300, 16, config.num_key_value_heads, config.head_dim, dtype, devices)
    if persistent:
        engine = make_engine(model, cache, [], cuda_graphs=graphs)
        assert engine.persistent is not None, "the persistent step should run here"
        if any_length:
            engine.persistent.longest_context = cache.capacity_tokens
        return engine
    return Engine(model, cache, [], make_decode_graphs(model, cache) if graphs else None)


def _run(engine, prompt, steps):
    """Logits of the prompt's last position, then of `steps` fixed tokens fed one by one."""
    seq = engine.new_sequence(prompt, SamplingParams())
    out = [engine.forward([seq], [prompt])[0].clone()]
    for token in steps:
        out.append(engine.forward([seq], [[token]])[0].clone())
    engine.finish(seq, "stop")
    return torch.cat(out)


def _prompt(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("length", [5, 150, 2100])   # one tile, two or three, splits of several
def test_logits_match_the_per_op_kernels(name, length):
    config = CONFIGS[name]
    dtype = torch.bfloat16
    state = _state(config, dtype)
    prompt, steps = _prompt(length, config.vocab_size), _prompt(6, config.vocab_size, seed=1)
    want = _run(_engine(config, state, dtype, False, graphs=True), prompt, steps)
    got = _run(_engine(config, state, dtype, True, graphs=True), prompt, steps)
    err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
    assert err < 2e-2, err
    # the same next token wherever the per-op path's choice is not a near tie
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05 * want.std(dim=-1)
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_the_wide_config_packs_w2s_input():
    config = CONFIGS["wide"]
    engine = _engine(config, _state(config, torch.bfloat16), torch.bfloat16, True, graphs=False)
    # the logits test covers both ways: "wide" packs w2's input, the others keep it whole
    assert engine.persistent.meta["X_CHUNKS"] < config.intermediate_size // pd.BLOCK_K
    for other in ("d64", "d128"):
        c = CONFIGS[other]
        whole = c.intermediate_size // pd.BLOCK_K
        assert pd.row_chunks(c, engine.persistent.grid[0], 2, pd.HOPPER_SHARED_BYTES) >= whole


@pytest.mark.parametrize("graphs", [True, False])
def test_sequences_past_the_longest_context_go_to_the_per_op_kernels(graphs):
    """A sequence that grows past the persistent step's longest context moves to the per-op
    kernels on the way (graphed and eager), and the logits stay those of the per-op path."""
    config = CONFIGS["d128"]
    state = _state(config, torch.bfloat16)
    engine = _engine(config, state, torch.bfloat16, True, graphs=graphs, any_length=False)
    # the rule's limit here (8192 positions on 132 SMs) is past this cache and the positions:
    # a lower one takes the same way
    engine.persistent.longest_context = longest = 1000
    prompt, steps = _prompt(longest - 3, config.vocab_size), _prompt(6, config.vocab_size, seed=5)
    got = _run(engine, prompt, steps)
    want = _run(_engine(config, state, torch.bfloat16, False, graphs=graphs), prompt, steps)
    err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
    assert err < 2e-2, err
    if graphs:   # the last steps replayed the per-op graph of batch 1
        assert engine.graphs.last_replayed is engine.graphs.graphs[1]
        assert engine.graphs.persistent_graph is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cache_writes_match_the_per_op_kernels(dtype):
    config = CONFIGS["d128"]
    state = _state(config, dtype)
    engines = [_engine(config, state, dtype, p, graphs=False) for p in (False, True)]
    for engine in engines:
        _run(engine, _prompt(70, config.vocab_size), _prompt(5, config.vocab_size, seed=3))
    want, got = (e.cache.pools[0].float() for e in engines)
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_graph_and_eager_give_the_same_bits():
    """One deterministic kernel: the graph replay and the eager launch agree exactly."""
    config = CONFIGS["d64"]
    state = _state(config, torch.bfloat16)
    prompt, steps = _prompt(90, config.vocab_size), _prompt(8, config.vocab_size, seed=4)
    graphed = _run(_engine(config, state, torch.bfloat16, True, graphs=True), prompt, steps)
    eager = _run(_engine(config, state, torch.bfloat16, True, graphs=False), prompt, steps)
    assert torch.equal(graphed, eager)


def test_generation_runs_through_the_persistent_step():
    """Greedy generation with launched steps (tokens fed on the device) as the scheduler runs
    it: the same tokens with the graph and without."""
    config = CONFIGS["d64"]
    state = _state(config, torch.bfloat16)
    results = []
    for graphs in (True, False):
        engine = _engine(config, state, torch.bfloat16, True, graphs=graphs)
        seq = engine.new_sequence(_prompt(20, config.vocab_size), SamplingParams(max_new_tokens=24))
        results.append([t for step in engine.generate([seq]) for _, t in step])
    assert results[0] == results[1] and len(results[0]) == 24
