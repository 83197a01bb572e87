"""Summary of a decode step's kernel timeline (bench.profile_step --timeline): per kernel name,
how many launches a step has, their mean duration, and how far each starts before the one before
it ends (programmatic dependent launch overlaps them), for the middle one of several replays."""
from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple


class Kernel(NamedTuple):
    name: str
    start_us: float
    duration_us: float


def middle_step(kernels: list[Kernel], replays: int) -> list[Kernel]:
    """The kernels of the middle replay (the first and last may meet a cold or busy GPU)."""
    if replays < 1 or len(kernels) % replays:
        raise ValueError(f"{len(kernels)} kernels do not split into {replays} equal replays")
    per_step = len(kernels) // replays
    middle = replays // 2
    return kernels[middle * per_step:(middle + 1) * per_step]


def summarize(step: list[Kernel]) -> str:
    """A markdown table of one step's kernels by name, in order of total time, and its span."""
    launches = defaultdict(list)   # name -> [(duration, overlap with the kernel before)]
    prev_end = None
    for k in step:
        overlap = 0.0 if prev_end is None else prev_end - k.start_us
        launches[k.name].append((k.duration_us, overlap))
        prev_end = k.start_us + k.duration_us if prev_end is None else max(
            prev_end, k.start_us + k.duration_us)
    span = prev_end - step[0].start_us if step else 0.0
    lines = [f"one step: {len(step)} kernels, {span:.1f} us from the first start to the last end",
             "| kernel | launches | mean us | total us | mean us begun before the last one ended |",
             "| --- | --- | --- | --- | --- |"]
    by_total = sorted(launches.items(), key=lambda kv: -sum(d for d, _ in kv[1]))
    for name, runs in by_total:
        total = sum(d for d, _ in runs)
        overlap = sum(o for _, o in runs) / len(runs)
        lines.append(f"| {name[:60]} | {len(runs)} | {total / len(runs):.2f} | {total:.1f} | "
                     f"{overlap:.2f} |")
    return "\n".join(lines)
