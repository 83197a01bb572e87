"""Acceptance of the CPU engine: logits and greedy tokens equal transformers' on tiny random
checkpoints written by save_pretrained, across the Llama variants met in the wild."""
import pytest
import torch

from api.inference import LlamaGenerator
from runtime.sampler import SamplingParams
from tests.helpers.tiny_models import LLAMA3_SCALING, make_hf_llama
from tests.helpers.tiny_tokenizer import EOS_ID

VARIANTS = {
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mha": dict(n_heads=4, n_kv_heads=4),
    "mqa": dict(n_heads=4, n_kv_heads=1),
    "tied": dict(tie=True),
    "llama3_rope": dict(rope_scaling=LLAMA3_SCALING, rope_theta=500000.0),
    "linear_rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "head_dim": dict(head_dim=32, n_heads=4, n_kv_heads=2),
    "legacy_sharded_bin": dict(safe=False, max_shard_size="40KB", legacy_config=True),
    "sharded_safetensors": dict(max_shard_size="40KB"),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_hf_llama(path, seed=len(request.param), **VARIANTS[request.param])
    ours = LlamaGenerator(str(path), fmt="hf", device="cpu", kv_cache_tokens=512)
    return hf, ours


def _prompt(n, seed=0, vocab=320):
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = _prompt(37)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].float()
    got = ours.logits(ids)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


def test_greedy_generation_matches_transformers(pair):
    hf, ours = pair
    ids = _prompt(11, seed=1)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    want = out[:out.index(EOS_ID) + 1] if EOS_ID in out else out
    assert ours.generate_ids(ids, max_new_tokens=32) == want


def test_batch_equals_each_prompt_alone(pair):
    _, ours = pair
    prompts = [_prompt(n, seed=n) for n in (3, 18, 33, 7)]
    alone = [ours.generate_ids(p, max_new_tokens=12) for p in prompts]
    engine = ours.engine
    seqs = [engine.new_sequence(p, SamplingParams(max_new_tokens=12)) for p in prompts]
    for _ in engine.generate(seqs):
        pass
    assert [s.output_ids for s in seqs] == alone
    texts = [ours.tokenizer.decode(p) for p in prompts]
    assert ours.generate(texts, max_new_tokens=12) == [ours.generate(t, max_new_tokens=12)
                                                       for t in texts]
    assert ours.cache.allocator.num_free == ours.cache.num_blocks
