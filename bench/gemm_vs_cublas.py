"""The Triton GEMM against cuBLAS (torch.nn.functional.linear) on a model's linear shapes, in
device time: each call is replayed from a CUDA graph, so the launch cost the host pays eagerly is
left out (decode and batched decode run as graphs). Small weights stay in L2 between replays, so
the T=1 rates of the small projections are upper bounds."""
from __future__ import annotations

import torch
import triton.testing

from kernels.linear import linear_triton

ROWS = (1, 256, 512)


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(N, K) of each projection of a shape."""
    c = config
    return {"wqkv": (c.q_size + 2 * c.kv_size, c.hidden_size), "wo": (c.hidden_size, c.q_size),
            "w13": (2 * c.intermediate_size, c.hidden_size),
            "w2": (c.hidden_size, c.intermediate_size), "head": (c.vocab_size, c.hidden_size)}


def device_us(fn) -> float:
    fn()   # autotuning and compilation stay out of the graph
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def gemm_table(config, device, rows_list=ROWS, dtype=torch.bfloat16) -> str:
    lines = ["| op | T | N x K | Triton us | cuBLAS us | Triton TFLOP/s or GB/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, (n, k) in linear_shapes(config).items():
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        for t in rows_list:
            x = torch.randn(t, k, device=device, dtype=dtype)
            ours = device_us(lambda: linear_triton(x, w))
            cublas = device_us(lambda: torch.nn.functional.linear(x, w))
            rate = (f"{2 * t * n * k / ours / 1e6:.0f} TFLOP/s" if t > 16
                    else f"{w.numel() * w.element_size() / ours / 1e3:.0f} GB/s")
            lines.append(f"| {name} | {t} | {n} x {k} | {ours:.1f} | {cublas:.1f} | {rate} |")
    return "\n".join(lines)
