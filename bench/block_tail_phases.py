"""Session 7 experiment (kernels/block_tail.py, reverted after it): the persistent block-tail
kernel against the separate decode kernels, phase by phase, at batch 1 on random bf16 weights.
Each figure is one call's GPU time inside a CUDA graph of 16 back-to-back calls, best of 5.
usage: python -m bench.block_tail_phases"""
import os

import torch

from kernels.block_tail import block_tail_ops, block_tail_triton
from kernels.gate_up_silu import gate_up_silu
from kernels.linear import linear

DEV = "cuda"
SHAPES = {"8b": (4096, 4096, 14336, 6144), "1b": (2048, 2048, 8192, 3072)}
KNOBS = ("LLAMA_TRITON_TAIL_LATE", "LLAMA_TRITON_TAIL_PREFETCH", "LLAMA_TRITON_TAIL_WARPS",
         "LLAMA_TRITON_TAIL_TILE", "LLAMA_TRITON_TAIL_ONLY")
VARIANTS = [{}, {"LLAMA_TRITON_TAIL_LATE": "1"}, {"LLAMA_TRITON_TAIL_PREFETCH": "4"},
            {"LLAMA_TRITON_TAIL_PREFETCH": "16"},
            {"LLAMA_TRITON_TAIL_LATE": "1", "LLAMA_TRITON_TAIL_PREFETCH": "4"},
            {"LLAMA_TRITON_TAIL_LATE": "1", "LLAMA_TRITON_TAIL_WARPS": "8",
             "LLAMA_TRITON_TAIL_TILE": "32768"}]


def operands(H, KQ, I, NQ):
    bf16 = torch.bfloat16
    rnd = lambda *s: (torch.randn(*s, device=DEV) * s[-1] ** -0.5).to(bf16)
    ones = torch.ones(H, device=DEV, dtype=bf16)
    args = [torch.randn(1, KQ, device=DEV, dtype=bf16), torch.randn(1, H, device=DEV, dtype=bf16),
            rnd(H, KQ), ones, rnd(2 * I, H), rnd(H, I)]
    return args, (ones, rnd(NQ, H))


def graph_us(fn, calls=16):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / calls * 1e3)
    return best


def with_knobs(knobs, fn):
    for k in KNOBS:
        os.environ.pop(k, None)
    os.environ.update(knobs)
    return graph_us(fn)


def main():
    for shape, (H, KQ, I, NQ) in SHAPES.items():
        args, nxt = operands(H, KQ, I, NQ)
        x, y = args[1], torch.randn(1, I, device=DEV, dtype=torch.bfloat16)
        tail = lambda: block_tail_triton(*args, 1e-5, *nxt)
        print(f"{shape} separate kernels: {graph_us(lambda: block_tail_ops(*args, 1e-5, *nxt)):.1f} us")
        alone = [lambda: linear(args[0], args[2]), lambda: gate_up_silu(x, args[4]),
                 lambda: linear(y, args[5]), lambda: linear(x, nxt[1])]
        for phase, fn in enumerate(alone):
            print(f"{shape} phase {phase} as its separate kernel: {graph_us(fn):.1f} us")
        for only in ("0", "1", "2", "3", "phased"):
            us = with_knobs({"LLAMA_TRITON_TAIL_ONLY": only}, tail)
            print(f"{shape} block tail, phase {only} launched alone: {us:.1f} us")
        for knobs in VARIANTS:
            print(f"{shape} block tail, one launch {knobs}: {with_knobs(knobs, tail):.1f} us")


if __name__ == "__main__":
    main()
