"""Where the time of one step goes: the GPU kernels by total time, and the host's share, for a
512-token prefill and for a CUDA-graph decode step, with torch.profiler.

    python -m bench.profile_step --shape 1b
    python -m bench.profile_step --shape 8b --timeline steps.csv

--timeline also writes every kernel of a few replayed batch-1 decode steps, in launch order,
with its start and duration, so that a GEMV's bandwidth (its weight bytes over its duration) and
the gaps between launches can be read off.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench.ours import build_engine, decode_tokens_per_s, graph_replay_ms
from bench.shapes import SHAPES
from bench.timeline import Kernel, middle_step, summarize
from runtime.sampler import SamplingParams


def _prefill(engine, length=512):
    prompt = torch.randint(0, engine.model.config.vocab_size, (length,)).tolist()
    seq = engine.new_sequence(prompt, SamplingParams(max_new_tokens=1))
    for _ in engine.generate([seq]):
        pass


def _report(title, prof, rows=14):
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    print(f"\n## {title}: GPU kernel time {gpu_us / 1e3:.2f} ms in all")
    print(events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))


def _write_timeline(engine, path, replays=3):
    graph_replay_ms(engine, replays=2)  # warm
    segments = engine.graphs.last_replayed.graphs
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            for g in segments:
                g.replay()
        torch.cuda.synchronize()
    kernels = sorted((Kernel(e.name.replace(",", ";"), e.time_range.start,
                             e.time_range.elapsed_us())
                      for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda k: k.start_us)
    with open(path, "w") as out:
        out.write("name,start_us,duration_us\n")
        for k in kernels:
            out.write(f"{k.name},{k.start_us:.3f},{k.duration_us:.3f}\n")
    print(f"\n{len(kernels)} kernels of {replays} replays written to {path}")
    print(summarize(middle_step(kernels, replays)))


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--timeline", metavar="CSV", help="write each kernel of replayed steps")
    args = parser.parse_args()
    engine = build_engine(SHAPES[args.shape], torch.device("cuda", torch.cuda.current_device()))
    decode_tokens_per_s(engine, new_tokens=8)
    _prefill(engine)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _prefill(engine)
        torch.cuda.synchronize()
    _report("prefill of 512 tokens (eager)", prof)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode_tokens_per_s(engine, new_tokens=10)
        torch.cuda.synchronize()
    _report("10 decode steps (CUDA graphs) after a 16-token prefill", prof)
    if args.timeline:
        _write_timeline(engine, args.timeline)


if __name__ == "__main__":
    main()
