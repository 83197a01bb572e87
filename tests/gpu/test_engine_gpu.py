"""The whole engine on a real GPU: Triton kernels, CUDA graphs, layer split, a real model."""
import os

import pytest
import torch

from api.inference import LlamaGenerator
from tests.helpers.tiny_models import make_hf_llama
from utils.hf_import import convert

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPE = dict(vocab=320, hidden=256, intermediate=512, layers=3, n_heads=8, n_kv_heads=2,
             max_positions=1024)


@pytest.fixture(scope="module")
def hf_and_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_tiny")
    hf = make_hf_llama(path, **SHAPE)
    return hf, convert(str(path))


def _ids(n, seed=0):
    return torch.randint(2, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 3e-2), ("float16", 5e-3)])
def test_logits_match_transformers(hf_and_dir, dtype, tol):
    hf, model_dir = hf_and_dir
    ids = _ids(300)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
    got = LlamaGenerator(model_dir, device="cuda", dtype=dtype).logits(ids)
    assert _rel(got, want) < tol


def test_fp32_greedy_equals_cpu(hf_and_dir):
    _, model_dir = hf_and_dir
    ids = _ids(20, seed=1)
    cpu = LlamaGenerator(model_dir, device="cpu").generate_ids(ids, max_new_tokens=24)
    gpu = LlamaGenerator(model_dir, device="cuda", dtype="float32").generate_ids(ids, 24)
    assert gpu == cpu


def _step_logits(engine, prompt, steps):
    """Logits of a prompt's prefill, then of `steps` decode steps (graph replays), [steps + 1,
    vocab]: a graph's logits are its static buffer, so each is copied before the next step."""
    from runtime.sampler import SamplingParams
    seq = engine.new_sequence(prompt, SamplingParams())
    rows = [engine.forward([seq], [prompt])[0][0].clone()]
    for t in range(steps):
        rows.append(engine.forward([seq], [[5 + t]])[0][0].clone())
    engine.finish(seq, "stop")
    return torch.stack(rows)


@pytest.mark.parametrize("switch", ["LLAMA_TRITON_PDL", "LLAMA_TRITON_SUM_LATER"])
def test_switches_that_change_no_bit(hf_and_dir, monkeypatch, switch):
    # the same arithmetic with and without PDL (kernels/pdl.py), or with split-K partials
    # summed by the RMSNorm that reads them (kernels.linear.SplitPartials): identical tokens and
    # logits, in bf16, where an input read before the kernel that writes it had finished would
    # show. The autotuners are keyed without the switch, so both runs use the same tiles.
    _, model_dir = hf_and_dir
    prompt = _ids(30, seed=3)
    runs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv(switch, mode)
        gen = LlamaGenerator(model_dir, device="cuda", dtype="bfloat16")
        assert gen.engine.graphs is not None
        runs[mode] = (gen.generate_ids(prompt, 40), _step_logits(gen.engine, prompt, 12),
                      gen.logits(prompt + [5, 6, 7]))
    assert runs["1"][0] == runs["0"][0]
    assert torch.equal(runs["1"][1], runs["0"][1]) and torch.equal(runs["1"][2], runs["0"][2])


def test_graph_and_eager_decode_give_the_same_tokens(hf_and_dir):
    # fp32: the graph's attention is split for its fixed max length and eager's for the real
    # one, a different summation order that can flip a near-tie greedy token in bf16
    _, model_dir = hf_and_dir
    prompts = [_ids(n, seed=n) for n in (5, 40, 17)]
    graphs = LlamaGenerator(model_dir, device="cuda", dtype="float32")
    eager = LlamaGenerator(model_dir, device="cuda", dtype="float32", cuda_graphs=False)
    assert graphs.engine.graphs is not None and eager.engine.graphs is None
    for p in prompts:
        assert graphs.generate_ids(p, 32) == eager.generate_ids(p, 32)


def test_batch_logits_match_alone(hf_and_dir):
    """Prefill of ragged prompts together, then decode steps together, against each alone."""
    from runtime.sampler import SamplingParams
    _, model_dir = hf_and_dir
    engine = LlamaGenerator(model_dir, device="cuda", dtype="float32").engine
    prompts = [_ids(n, seed=n) for n in (3, 30, 9, 64)]

    def run(batch):
        seqs = [engine.new_sequence(p, SamplingParams()) for p in batch]
        # a graph returns its static logits buffer, which the next replay overwrites: copy
        steps = [engine.forward(seqs, [p for p in batch])[0].clone()]
        for _ in range(3):
            steps.append(engine.forward(seqs, [[7]] * len(seqs))[0].clone())
        for s in seqs:
            engine.finish(s, "stop")
        return torch.stack(steps, 1)  # [B, steps, vocab]

    together = run(prompts)
    alone = torch.cat([run([p]) for p in prompts])
    assert _rel(together, alone) < 1e-5


def test_batch_on_gpu_equals_alone(hf_and_dir):
    _, model_dir = hf_and_dir
    gen = LlamaGenerator(model_dir, device="cuda", dtype="float32")
    texts = [gen.tokenizer.decode(_ids(n, seed=n)) for n in (3, 30, 9, 64)]
    assert gen.generate(texts, max_new_tokens=16) == [gen.generate(t, max_new_tokens=16)
                                                      for t in texts]
    assert gen.cache.allocator.num_free == gen.cache.num_blocks - 1  # the graphs' scratch block


def test_split_on_one_gpu_equals_unsplit(hf_and_dir):
    _, model_dir = hf_and_dir
    ids = _ids(50, seed=3)
    one = LlamaGenerator(model_dir, device="cuda", dtype="bfloat16")
    split = LlamaGenerator(model_dir, devices=["cuda:0", "cuda:0"], dtype="bfloat16")
    assert _rel(split.logits(ids), one.logits(ids)) < 1e-3
    assert split.generate_ids(ids, 16) == one.generate_ids(ids, 16)


def test_prefill_graph_logits_equal_eager(hf_and_dir):
    """A prompt prefilled as a padded CUDA graph (bucket 128) gives the eager logits."""
    from runtime.sampler import SamplingParams
    _, model_dir = hf_and_dir
    graphs = LlamaGenerator(model_dir, device="cuda", dtype="float32").engine
    eager = LlamaGenerator(model_dir, device="cuda", dtype="float32", cuda_graphs=False).engine
    prompt = _ids(100, seed=8)
    got = [e.forward([e.new_sequence(prompt, SamplingParams())], [prompt])[0]
           for e in (graphs, eager)]
    assert 128 in graphs.graphs.prefill.graphs
    assert _rel(got[0], got[1]) < 1e-5


def test_graphs_per_segment_equal_one_graph(hf_and_dir):
    """A split model gets one decode graph per device segment; two segments on one GPU must
    give the tokens of the unsplit model."""
    _, model_dir = hf_and_dir
    one = LlamaGenerator(model_dir, device="cuda", dtype="float32")
    split = LlamaGenerator(model_dir, devices=["cuda:0", "cuda:0"], dtype="float32")
    device = split.model.first_device
    split.model.segments = [(device, 0, 1), (device, 1, 3)]
    for p in (_ids(5, seed=5), _ids(70, seed=6)):
        assert split.generate_ids(p, 24) == one.generate_ids(p, 24)
    assert len(split.engine.graphs.graphs[1].graphs) == 2


def test_torch_backend_on_gpu_agrees(hf_and_dir, monkeypatch):
    _, model_dir = hf_and_dir
    ids = _ids(33, seed=4)
    triton_logits = LlamaGenerator(model_dir, device="cuda", dtype="float32").logits(ids)
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    torch_gen = LlamaGenerator(model_dir, device="cuda", dtype="float32")
    assert torch_gen.engine.graphs is None
    assert _rel(torch_gen.logits(ids), triton_logits) < 1e-4


SMOLLM2 = os.environ.get("LLAMA_TRITON_SMOLLM2_GGUF")


@pytest.mark.skipif(not SMOLLM2 or not os.path.isfile(SMOLLM2),
                    reason="set LLAMA_TRITON_SMOLLM2_GGUF to the SmolLM2 GGUF file")
def test_real_smollm2_fp32_gpu_tokens_equal_cpu():
    prompt = "The capital of France is"
    cpu = LlamaGenerator(SMOLLM2, device="cpu")
    gpu = LlamaGenerator(SMOLLM2, device="cuda", dtype="float32")
    ids = cpu.tokenizer.encode(prompt)
    want = cpu.generate_ids(ids, max_new_tokens=24)
    assert gpu.generate_ids(ids, max_new_tokens=24) == want
    assert gpu.generate(prompt, max_new_tokens=4).startswith(" Paris")
