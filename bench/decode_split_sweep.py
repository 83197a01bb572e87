"""Decode GEMV time for each split-K choice of a shape's small-N projections (wqkv, wo, w2):
the figures behind kernels.linear.decode_split_k, whose pick is marked. Batch 1, device time
from a CUDA graph. Each pass cycles through enough copies of the weight to overflow L2, so the
weight streams from DRAM as it does in a decode step (one copy of the 8B shape's wo, 34 MB,
would stay in the H200's 50 MB L2 between calls). The "L2-hot" column calls the kernel on one
copy throughout instead: where the weight fits in L2, how much of the time DRAM accounts for.
usage: python -m bench.decode_split_sweep --shape 8b"""
from __future__ import annotations

import argparse

import torch
import triton

from bench.gemm_vs_cublas import device_us, linear_shapes
from bench.shapes import SHAPES
from kernels.dispatch import sm_count
from kernels.linear import SPLIT_UNIT, _launch_decode, _round_split, decode_split_k

SPLITS = (1, 2, 3, 4, 5, 6, 8, 12, 16)
STREAM_BYTES = 256 << 20  # several times any L2 so far


def small_n_projections(config) -> dict[str, tuple[int, int]]:
    return {name: nk for name, nk in linear_shapes(config).items()
            if name in ("wqkv", "wo", "w2")}


def split_choices(K: int) -> list[tuple[int, int]]:
    """The distinct (splits, K per split) that kernels.linear can run for SPLITS, in order."""
    choices = {1: K}
    for split in SPLITS[1:]:
        if split <= triton.cdiv(K, SPLIT_UNIT):
            got, per = _round_split(split, K)
            choices.setdefault(got, per)
    return sorted(choices.items())


def _device_us(weights, x, split, per) -> float:
    out = torch.empty(1, weights[0].shape[0], device=x.device, dtype=x.dtype)  # copies: one shape

    def one_pass():
        for w in weights:
            _launch_decode(x, w, out, split, per)
    return device_us(one_pass) / len(weights)


def sweep_table(config, device, dtype=torch.bfloat16) -> str:
    lines = ["| op | N x K | splits | K per split | us | GB/s | L2-hot us | heuristic |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, (n, k) in small_n_projections(config).items():
        nbytes = n * k * torch.finfo(dtype).bits // 8
        copies = triton.cdiv(STREAM_BYTES, nbytes)
        weights = [torch.randn(n, k, device=device, dtype=dtype) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device=device, dtype=dtype)
        pick = decode_split_k(n, k, sm_count(device))
        for split, per in split_choices(k):
            us = _device_us(weights, x, split, per)
            hot = _device_us(weights[:1] * len(weights), x, split, per)
            mark = "<-" if (split, per) == pick else ""
            lines.append(f"| {name} | {n} x {k} | {split} | {per} | {us:.1f} | "
                         f"{nbytes / us / 1e3:.0f} | {hot:.1f} | {mark} |")
        del weights
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    print(f"{torch.cuda.get_device_name(device)}, shape {args.shape}, batch 1, bf16")
    print(sweep_table(SHAPES[args.shape], device))


if __name__ == "__main__":
    main()
