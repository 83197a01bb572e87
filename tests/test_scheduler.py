"""The scheduler on a tiny random model: chunked prefill, preemption and prefix sharing give the
same greedy tokens as each request run alone, and no block leaks."""
import random

import pytest
import torch

from api.inference import LlamaGenerator
from runtime.kv_cache import OutOfBlocksError
from runtime.sampler import SamplingParams
from runtime.scheduler import Scheduler
from tests.helpers.tiny_models import make_hf_llama
from utils.hf_import import convert


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sched_tiny")
    make_hf_llama(path, max_positions=256)
    return convert(str(path))


@pytest.fixture(scope="module")
def gen(model_dir):
    return LlamaGenerator(model_dir, device="cpu", kv_cache_tokens=4096)


def _prompts(count, length, seed=0, prefix=()):
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(2, 320) for _ in range(length)] for _ in range(count)]


def _params(n, **kw):
    # EOS off, so every request runs its full length and the comparisons are long ones
    return SamplingParams(max_new_tokens=n, **kw)


def _alone(gen, ids, params):
    seq = gen.engine.new_sequence(ids, params)
    for _ in gen.engine.generate([seq]):
        pass
    return seq.output_ids


def _batched(gen, prompts, params, **options):
    sched = Scheduler(gen.engine, **options)
    seqs = [sched.add(gen.engine.new_sequence(p, params)) for p in prompts]
    for _ in sched.run():
        pass
    return [s.output_ids for s in seqs], sched


def _spy_forward(monkeypatch, engine):
    calls, real = [], engine.forward

    def spy(seqs, tokens, *args, **kw):
        calls.append([len(t) for t in tokens])
        return real(seqs, tokens, *args, **kw)

    monkeypatch.setattr(engine, "forward", spy)
    return calls


def _assert_no_leak(cache):
    assert cache.allocator.num_free == cache.num_blocks
    assert all(cache.allocator.ref_count(b) == 0 for b in range(cache.num_blocks))


@pytest.fixture(autouse=True)
def no_eos(gen, monkeypatch):
    monkeypatch.setattr(gen.engine, "eos_ids", set())


def test_chunked_prefill_mixed_with_decodes_matches_alone(gen, monkeypatch):
    prompts = _prompts(3, 40, seed=1) + _prompts(2, 5, seed=2)
    want = [_alone(gen, p, _params(10)) for p in prompts]
    calls = _spy_forward(monkeypatch, gen.engine)
    got, _ = _batched(gen, prompts, _params(10), max_num_batched_tokens=24, prefix_caching=False)
    assert got == want
    assert max(sum(c) for c in calls) <= 24
    assert any(1 in c and max(c) > 1 for c in calls), "a step should mix decodes and a prefill"
    _assert_no_leak(gen.cache)


def test_a_mid_prompt_chunk_samples_nothing(gen):
    sched = Scheduler(gen.engine, max_num_batched_tokens=16)
    seq = sched.add(gen.engine.new_sequence(_prompts(1, 40)[0], _params(3)))
    assert sched.step() == [] and sched.step() == []
    assert sched.step() == [(seq, seq.output_ids[0])]
    sched.abort_all()
    _assert_no_leak(gen.cache)


@pytest.mark.parametrize("lookahead", [False, True])
def test_preemption_recomputes_and_keeps_tokens(model_dir, lookahead):
    small = LlamaGenerator(model_dir, device="cpu", kv_cache_tokens=160)   # 10 blocks
    small.engine.eos_ids = set()
    prompts = _prompts(4, 30, seed=3)
    want = [_alone(small, p, _params(24)) for p in prompts]
    got, sched = _batched(small, prompts, _params(24), lookahead=lookahead)
    assert sched.num_preemptions > 0
    assert got == want and all(len(g) == 24 for g in got)
    _assert_no_leak(small.cache)


def test_prefix_sharing_uses_fewer_blocks_for_the_same_tokens(gen):
    prompts = _prompts(4, 7, seed=4, prefix=_prompts(1, 64, seed=5)[0])
    want = [_alone(gen, p, _params(6)) for p in prompts]
    gen.cache.allocator.clear_cache()
    plain, plain_sched = _batched(gen, prompts, _params(6), prefix_caching=False)
    gen.cache.allocator.clear_cache()
    shared, shared_sched = _batched(gen, prompts, _params(6))
    assert plain == shared == want
    # four private copies of a 4-block prefix against one shared copy
    assert plain_sched.peak_blocks_in_use - shared_sched.peak_blocks_in_use == 12
    assert shared_sched.num_cached_tokens == 3 * 64
    _assert_no_leak(gen.cache)


def test_a_later_request_reuses_the_cached_prefix(gen):
    prompt = _prompts(1, 50, seed=6)[0]
    first, _ = _batched(gen, [prompt], _params(5))
    again, sched = _batched(gen, [prompt], _params(5))
    assert again == first and sched.num_cached_tokens == 48
    _assert_no_leak(gen.cache)


@pytest.mark.parametrize("lookahead", [False, True])
def test_requests_join_between_steps(gen, lookahead):
    prompts = _prompts(3, 12, seed=7)
    want = [_alone(gen, p, _params(8)) for p in prompts]
    sched = Scheduler(gen.engine, lookahead=lookahead)
    seqs = [sched.add(gen.engine.new_sequence(prompts[0], _params(8)))]
    for step_number, _ in enumerate(sched.run()):
        if step_number in (2, 4):
            seqs.append(sched.add(gen.engine.new_sequence(prompts[len(seqs)], _params(8))))
    assert [s.output_ids for s in seqs] == want


def test_max_num_seqs_caps_the_batch(gen, monkeypatch):
    calls = _spy_forward(monkeypatch, gen.engine)
    got, _ = _batched(gen, _prompts(5, 6, seed=8), _params(4), max_num_seqs=2)
    assert all(len(g) == 4 for g in got) and max(len(c) for c in calls) == 2


def test_per_request_sampling_params(gen):
    prompts = _prompts(3, 9, seed=9)
    params = [_params(5), _params(7, temperature=0.9, top_k=40, seed=3), _params(2)]
    want = [_alone(gen, p, sp) for p, sp in zip(prompts, params)]
    sched = Scheduler(gen.engine)
    seqs = [sched.add(gen.engine.new_sequence(p, sp)) for p, sp in zip(prompts, params)]
    for _ in sched.run():
        pass
    assert [s.output_ids for s in seqs] == want
    assert [len(s.output_ids) for s in seqs] == [5, 7, 2]


def test_repetition_penalty_sees_the_history(gen):
    prompt = _prompts(1, 9, seed=10)[0]
    params = _params(6, repetition_penalty=1.5)
    got, _ = _batched(gen, [prompt, prompt], params)
    assert got == [_alone(gen, prompt, params)] * 2


def test_the_caller_finishes_a_request(gen):
    sched = Scheduler(gen.engine)
    a, b = (sched.add(gen.engine.new_sequence(p, _params(20))) for p in _prompts(2, 8, seed=11))
    steps = sched.run()
    next(steps)
    sched.finish(a)
    assert a.finish_reason == "stop" and a.blocks.blocks == [] and sched.running == [b]
    for _ in steps:
        pass
    assert len(a.output_ids) == 1 and len(b.output_ids) == 20
    _assert_no_leak(gen.cache)


def test_stopping_early_aborts_the_rest(gen):
    sched = Scheduler(gen.engine)
    seqs = [sched.add(gen.engine.new_sequence(p, _params(20))) for p in _prompts(3, 8)]
    steps = sched.run()
    next(steps)
    steps.close()
    assert all(s.finish_reason == "abort" for s in seqs) and not sched.has_unfinished
    _assert_no_leak(gen.cache)


@pytest.mark.parametrize("lookahead", [False, True])
def test_context_limit_finishes_a_request(model_dir, lookahead):
    short = LlamaGenerator(model_dir, device="cpu", kv_cache_tokens=4096)
    short.engine.context = 20
    got, _ = _batched(short, _prompts(2, 15, seed=12), _params(50), lookahead=lookahead)
    assert [len(g) for g in got] == [5, 5]


def test_a_failed_step_forgets_unwritten_prefixes(gen, monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("device lost")

    monkeypatch.setattr(gen.engine, "forward", broken)
    sched = Scheduler(gen.engine)
    sched.add(gen.engine.new_sequence(_prompts(1, 40)[0], _params(2)))
    with pytest.raises(RuntimeError, match="device lost"):
        list(sched.run())
    assert gen.cache.allocator.num_cached == 0
    _assert_no_leak(gen.cache)


@pytest.mark.parametrize("option, value, message", [
    ("max_num_batched_tokens", 0, "max_num_batched_tokens must be an integer >= 1, got 0"),
    ("max_num_seqs", 1.5, "max_num_seqs must be an integer >= 1, got 1.5"),
])
def test_bad_options_are_refused(gen, option, value, message):
    with pytest.raises(ValueError, match=message):
        Scheduler(gen.engine, **{option: value})


def test_default_token_budget_on_the_cpu(gen):
    assert Scheduler(gen.engine).max_num_batched_tokens == 512


def test_a_prompt_larger_than_the_cache_is_refused(model_dir):
    small = LlamaGenerator(model_dir, device="cpu", kv_cache_tokens=32)
    seq = small.engine.new_sequence(_prompts(1, 40)[0], _params(2))
    with pytest.raises(OutOfBlocksError, match="the prompt of 40 tokens needs 3 blocks, the cache holds 2"):
        Scheduler(small.engine).add(seq)


def test_blocks_held_elsewhere_leave_nothing_to_preempt(model_dir):
    small = LlamaGenerator(model_dir, device="cpu", kv_cache_tokens=64)
    held = small.cache.allocator.allocate(3)
    sched = Scheduler(small.engine)
    sched.add(small.engine.new_sequence(_prompts(1, 20)[0], _params(2)))
    with pytest.raises(OutOfBlocksError, match="needs 2 more blocks, 1 free of 4 and nothing left"):
        list(sched.run())
    small.cache.allocator.free(held)
    _assert_no_leak(small.cache)


# with lookahead, EOS tokens end requests while a step runs ahead of them
@pytest.mark.parametrize("lookahead, eos_ids, seed, finish_below", [
    (False, set(), 1234, 0.25), (True, {7, 11}, 99, 0.22)])
def test_fuzz_admit_finish_preempt_leaves_no_block_behind(model_dir, lookahead, eos_ids, seed,
                                                          finish_below):
    small = LlamaGenerator(model_dir, device="cpu", kv_cache_tokens=192)   # 12 blocks
    small.engine.eos_ids = eos_ids
    cache, rng = small.cache, random.Random(seed)
    prefixes = _prompts(3, 20, seed=13)
    sched = Scheduler(small.engine, max_num_batched_tokens=40, max_num_seqs=6,
                      lookahead=lookahead)
    for _ in range(1000):
        action = rng.random()
        if action < 0.15:
            tail = _prompts(1, rng.randint(0, 12), seed=rng.random())[0]
            prompt = rng.choice(prefixes)[:rng.randint(1, 20)] + tail
            sched.add(small.engine.new_sequence(prompt, _params(rng.randint(1, 30))))
        elif action < finish_below and (sched.running or sched.waiting):
            sched.finish(rng.choice([*sched.running, *sched.waiting]))
        elif sched.has_unfinished:
            sched.step()
        _check_refs(cache, sched)
    assert sched.num_preemptions > 0 and sched.num_cached_tokens > 0
    sched.abort_all()
    _assert_no_leak(cache)


def _check_refs(cache, sched):
    holders = [b for s in [*sched.running, *sched.waiting] for b in s.blocks.blocks]
    for block in set(holders):
        assert cache.allocator.ref_count(block) == holders.count(block)
    assert cache.num_blocks - cache.allocator.num_free == len(set(holders))


def test_the_newest_request_preempts_itself_when_it_alone_needs_a_block(model_dir):
    small = LlamaGenerator(model_dir, device="cpu", kv_cache_tokens=64)   # 4 blocks
    small.engine.eos_ids = set()
    old, new = _prompts(1, 20, seed=14)[0], _prompts(1, 31, seed=15)[0]
    want = [_alone(small, old, _params(5)), _alone(small, new, _params(4))]
    sched = Scheduler(small.engine, prefix_caching=False)
    seqs = [sched.add(small.engine.new_sequence(old, _params(5))),
            sched.add(small.engine.new_sequence(new, _params(4)))]
    for _ in sched.run():
        pass
    assert sched.num_preemptions == 1 and [s.output_ids for s in seqs] == want
    _assert_no_leak(small.cache)


def test_a_graph_step_greedy_tokens_are_used(gen, monkeypatch):
    """On CUDA a decode-only step returns the graph's greedy tokens; plain greedy takes them."""
    real = gen.engine.forward

    def graph_like(seqs, tokens, *args, **kw):
        logits, _ = real(seqs, tokens, *args, **kw)
        return logits, torch.full((len(seqs),), 7)

    monkeypatch.setattr(gen.engine, "forward", graph_like)
    got, _ = _batched(gen, _prompts(2, 5, seed=16), _params(3))
    assert got == [[7, 7, 7]] * 2


def test_a_step_with_nothing_to_do(gen):
    assert Scheduler(gen.engine).step() == []


def test_graph_tokens_of_a_mid_prompt_row_are_not_taken(gen, monkeypatch):
    real = gen.engine.forward

    def graph_like(seqs, tokens, *args, **kw):
        logits, _ = real(seqs, tokens, *args, **kw)
        return logits, torch.arange(len(seqs)) + 100

    monkeypatch.setattr(gen.engine, "forward", graph_like)
    sched = Scheduler(gen.engine, max_num_batched_tokens=2)
    a = sched.add(gen.engine.new_sequence([5], _params(3)))
    b = sched.add(gen.engine.new_sequence([6, 7, 8], _params(1)))
    assert sched.step() == [(a, 100)]                  # a's prompt, then b's first token
    assert sched.step() == [(a, 100)]                  # row 1 is b mid-prompt: not sampled
    assert sched.step() == [(a, 100), (b, 101)]
    sched.abort_all()
