"""The scheduler on CUDA in float32: chunked prefill mixed with graph decodes, preemption and
prefix sharing give each request's greedy tokens alone."""
import pytest
import torch

from api.inference import LlamaGenerator
from runtime.sampler import SamplingParams
from runtime.scheduler import Scheduler
from tests.helpers.tiny_models import make_hf_llama
from utils.hf_import import convert

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPE = dict(vocab=320, hidden=256, intermediate=512, layers=3, n_heads=8, n_kv_heads=2,
             max_positions=1024)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_sched")
    make_hf_llama(path, **SHAPE)
    return convert(str(path))


def _ids(n, seed):
    return torch.randint(2, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _gen(model_dir, kv_cache_tokens):
    gen = LlamaGenerator(model_dir, device="cuda", dtype="float32",
                         kv_cache_tokens=kv_cache_tokens)
    gen.engine.eos_ids = set()   # every request runs its full length
    return gen


def _alone(gen, ids, n):
    seq = gen.engine.new_sequence(ids, SamplingParams(max_new_tokens=n))
    for _ in gen.engine.generate([seq]):
        pass
    return seq.output_ids


def _scheduled(gen, prompts, n, **options):
    sched = Scheduler(gen.engine, **options)
    seqs = [sched.add(gen.engine.new_sequence(p, SamplingParams(max_new_tokens=n)))
            for p in prompts]
    for _ in sched.run():
        pass
    return [s.output_ids for s in seqs], sched


def test_chunked_prefill_and_prefix_sharing_equal_alone(model_dir):
    gen = _gen(model_dir, 8192)
    prefix = _ids(100, seed=1)
    prompts = [prefix + _ids(n, seed=n) for n in (3, 30, 9)] + [_ids(n, seed=n) for n in (200, 5)]
    want = [_alone(gen, p, 24) for p in prompts]
    got, sched = _scheduled(gen, prompts, 24, max_num_batched_tokens=64)
    assert got == want and sched.num_cached_tokens >= 2 * 96
    assert gen.cache.allocator.num_free == gen.cache.num_blocks - 1   # the graphs' scratch block


def test_preemption_equals_alone(model_dir):
    gen = _gen(model_dir, 256)   # 16 blocks, one of them the graphs' scratch block
    prompts = [_ids(n, seed=n) for n in (40, 50, 33, 60)]
    want = [_alone(gen, p, 32) for p in prompts]
    got, sched = _scheduled(gen, prompts, 32)
    assert sched.num_preemptions > 0 and got == want
    assert gen.cache.allocator.num_free == gen.cache.num_blocks - 1


def test_lookahead_equals_plain_steps_through_eos_and_lengths(model_dir):
    gen = _gen(model_dir, 8192)
    prompts = [_ids(n, seed=40 + n) for n in (7, 19, 3, 45, 12)]
    lengths = (30, 6, 17, 30, 1)   # rows end at different steps; the batch crosses buckets
    gen.engine.eos_ids = {_alone(gen, prompts[0], 30)[10]}

    def scheduled(lookahead):
        sched = Scheduler(gen.engine, lookahead=lookahead)
        seqs = [sched.add(gen.engine.new_sequence(p, SamplingParams(max_new_tokens=n)))
                for p, n in zip(prompts, lengths)]
        for _ in sched.run():
            pass
        return [s.output_ids for s in seqs]

    assert Scheduler(gen.engine).lookahead   # on by default on CUDA
    assert scheduled(True) == scheduled(False)
    assert gen.cache.allocator.num_free == gen.cache.num_blocks - 1
