"""The scheduler's lookahead (decode step N+1 launched on step N's tokens before the host reads
them), on the CPU with a tiny random model: the same greedy tokens as without it and as each
request alone, through EOS, stops by the caller, length limits and prefix sharing, with no block
left behind. Preemption, the context limit, joining requests and the fuzz test run with and
without lookahead in tests/test_scheduler.py."""
from runtime.scheduler import Scheduler
from tests.test_scheduler import (_alone, _assert_no_leak, _params, _prompts,
                                  gen, model_dir, no_eos)  # noqa: F401 (fixtures)


def _run(gen, prompts, params, lookahead, **options):
    sched = Scheduler(gen.engine, lookahead=lookahead, **options)
    seqs = [sched.add(gen.engine.new_sequence(p, sp)) for p, sp in zip(prompts, params)]
    for _ in sched.run():
        pass
    return [s.output_ids for s in seqs], sched


def _count_ahead(monkeypatch, engine):
    """(rows, launched ahead) of every launched decode step."""
    calls, real = [], engine.launch_decode

    def spy(seqs, token_ids=None, after=None, rows=None):
        calls.append((len(seqs), after is not None))
        return real(seqs, token_ids, after, rows)

    monkeypatch.setattr(engine, "launch_decode", spy)
    return calls


def test_lookahead_gives_the_tokens_of_each_request_alone(gen, monkeypatch):
    prompts = _prompts(3, 30, seed=20) + _prompts(3, 4, seed=21)
    params = [_params(n) for n in (9, 3, 12, 5, 12, 1)]   # rows end at different steps
    want = [_alone(gen, p, sp) for p, sp in zip(prompts, params)]
    ahead = _count_ahead(monkeypatch, gen.engine)
    got, _ = _run(gen, prompts, params, True)   # one prefill step, then decodes only
    assert got == want
    assert sum(is_ahead for _, is_ahead in ahead) >= 8
    # no wasted row: a request that ends by length is not launched again
    assert sum(rows for rows, _ in ahead) == sum(len(g) for g in got) - len(prompts)
    _assert_no_leak(gen.cache)


def test_eos_met_while_a_step_ran_ahead(gen, monkeypatch):
    prompts = _prompts(4, 6, seed=22)
    free_run = [_alone(gen, p, _params(16)) for p in prompts]
    eos = free_run[0][5]
    monkeypatch.setattr(gen.engine, "eos_ids", {eos})
    want, _ = _run(gen, prompts, [_params(16)] * 4, False)
    got, _ = _run(gen, prompts, [_params(16)] * 4, True)
    assert got == want and got[0][-1] == eos and len(got[0]) <= 6
    _assert_no_leak(gen.cache)


def test_the_caller_finishes_a_request_with_a_step_in_flight(gen):
    sched = Scheduler(gen.engine, lookahead=True)
    a, b = (sched.add(gen.engine.new_sequence(p, _params(20))) for p in _prompts(2, 8, seed=23))
    steps = sched.run()
    next(steps), next(steps), next(steps)   # the prefill, then two steps read
    assert sched.launched is not None
    sched.finish(a)
    for _ in steps:
        pass
    assert len(a.output_ids) == 3 and len(b.output_ids) == 20
    assert b.output_ids == _alone(gen, b.prompt_ids, _params(20))
    _assert_no_leak(gen.cache)


def test_stopping_with_a_step_in_flight_aborts_it(gen):
    sched = Scheduler(gen.engine, lookahead=True)
    seqs = [sched.add(gen.engine.new_sequence(p, _params(20))) for p in _prompts(3, 8)]
    steps = sched.run()
    next(steps), next(steps)
    assert sched.launched is not None
    steps.close()
    assert sched.launched is None and all(s.finish_reason == "abort" for s in seqs)
    _assert_no_leak(gen.cache)


def test_blocks_filled_ahead_are_shared_later(gen):
    gen.cache.allocator.clear_cache()
    prompt = _prompts(1, 20, seed=24)[0]
    (first,), _ = _run(gen, [prompt], [_params(40)], True)
    follow_up = prompt + first[:32]                     # 52 tokens: three full blocks
    want = _alone(gen, follow_up, _params(4))
    gen.cache.allocator.clear_cache()
    _run(gen, [prompt], [_params(40)], True)
    (got,), sched = _run(gen, [follow_up], [_params(4)], True)
    assert sched.num_cached_tokens == 48 and got == want
    _assert_no_leak(gen.cache)


def test_sampled_requests_do_not_run_ahead(gen, monkeypatch):
    ahead = _count_ahead(monkeypatch, gen.engine)
    _run(gen, _prompts(2, 5, seed=25), [_params(6, temperature=0.8, seed=1)] * 2, True)
    assert ahead == []


def test_lookahead_is_off_by_default_on_the_cpu(gen):
    assert Scheduler(gen.engine).lookahead is False
