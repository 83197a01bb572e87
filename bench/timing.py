"""Timing helpers: device-synchronised wall clock and the measured copy bandwidth."""
from __future__ import annotations

import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int = 1) -> float:
    """Median seconds of fn() over repeat runs, each synchronised."""
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device, gigabytes: float = 2.0) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read plus bytes written."""
    n = int(gigabytes * 1e9) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = timed(lambda: [dst.copy_(src) for _ in range(5)], device, repeat=5) / 5
    return 2 * n * 2 / seconds  # src and dst are freed on return
