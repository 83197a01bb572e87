"""Where the time of a throughput run goes: the run with and without the scheduler's
lookahead, the host's time by function (cProfile), wall time per kind of scheduler step
(all-decode steps that replay a graph, steps that prefill) run one at a time, the GPU time of
one decode graph replayed alone at the run's batch, and the GPU kernels of the whole run by
total time (torch.profiler).

    python -m bench.profile_throughput --shape 1b --setting a
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench.bench_throughput import make_requests, run_ours
from bench.ours import build_engine
from bench.shapes import SHAPES
from bench.timing import sync, timed
from runtime.sampler import SamplingParams
from runtime.scheduler import Scheduler


class _RecordingScheduler(Scheduler):
    """Keeps the new tokens of the step it scheduled last."""

    def schedule(self):
        seqs, self.last_tokens = super().schedule()
        return seqs, self.last_tokens


def step_times(engine, prompts, new_tokens) -> dict[str, list[float]]:
    """Wall seconds of each scheduler step, keyed 'decode B' or 'prefill' (any step that runs
    more than one token of some sequence)."""
    engine.cache.allocator.clear_cache()   # no prompt found cached from the runs before
    scheduler = _RecordingScheduler(engine, lookahead=False)   # one step at a time
    for prompt in prompts:
        scheduler.add(engine.new_sequence(prompt, SamplingParams(max_new_tokens=new_tokens)))
    times = defaultdict(list)
    device = engine.model.first_device
    while scheduler.has_unfinished:
        sync(device)
        start = time.perf_counter()
        scheduler.step()
        sync(device)
        seconds = time.perf_counter() - start
        lengths = [len(t) for t in scheduler.last_tokens]
        kind = f"decode {len(lengths)}" if max(lengths) == 1 else "prefill"
        times[kind].append(seconds)
    engine.cache.allocator.clear_cache()
    return times


def replay_ms(engine, bucket: int, replays: int = 20) -> float | None:
    made = engine.graphs.graphs.get(bucket) if engine.graphs is not None else None
    if made is None:
        return None
    return 1e3 * timed(lambda: [g.replay() for _ in range(replays) for g in made.graphs],
                       engine.model.first_device, repeat=3) / replays


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--setting", default="a", choices=["a", "b"])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    engine = build_engine(SHAPES[args.shape], torch.device("cuda", torch.cuda.current_device()))
    prompts = make_requests(args.setting, engine.model.config.vocab_size, args.requests)
    run_ours(engine, prompts, args.new_tokens)   # warm-up: autotuning and graph capture
    for lookahead in (False, True):
        row = run_ours(engine, prompts, args.new_tokens, lookahead=lookahead)
        print(f"run, lookahead {'on' if lookahead else 'off'}: {row['gen_tps']:,.0f} generated "
              f"tok/s, {row['seconds']:.3f} s")
    host = cProfile.Profile()
    host.enable()
    run_ours(engine, prompts, args.new_tokens)
    host.disable()
    print("\nhost time of one run with lookahead, by function (cProfile; waits for the GPU show "
          "up in read):")
    pstats.Stats(host).sort_stats("tottime").print_stats(22)
    times = step_times(engine, prompts, args.new_tokens)
    print("\n| step | count | total ms | mean ms |\n| --- | --- | --- | --- |")
    for kind, values in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {kind} | {len(values)} | {1e3 * sum(values):.1f} | "
              f"{1e3 * sum(values) / len(values):.3f} |")
    bucket = min(args.requests, 256)
    print(f"\ndecode graph of bucket {bucket} replayed alone: {replay_ms(engine, bucket)} ms")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_ours(engine, prompts, args.new_tokens)
        torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    print(f"\nGPU kernel time of one run: {gpu_us / 1e3:.1f} ms")
    print(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
