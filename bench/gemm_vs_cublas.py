"""The Triton GEMM against cuBLAS (torch.nn.functional.linear) on a model's linear shapes."""
from __future__ import annotations

import torch
import triton.testing

from kernels.linear import linear_triton


def _shapes(config):
    c = config
    return {"wqkv": (c.q_size + 2 * c.kv_size, c.hidden_size), "wo": (c.hidden_size, c.q_size),
            "w13": (2 * c.intermediate_size, c.hidden_size),
            "w2": (c.hidden_size, c.intermediate_size), "head": (c.vocab_size, c.hidden_size)}


def gemm_table(config, device, rows_list=(1, 512), dtype=torch.bfloat16) -> str:
    lines = ["| op | T | N x K | Triton us | cuBLAS us | Triton TFLOP/s or GB/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, (n, k) in _shapes(config).items():
        w = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        for t in rows_list:
            x = torch.randn(t, k, device=device, dtype=dtype)
            ours = triton.testing.do_bench(lambda: linear_triton(x, w), return_mode="median")
            cublas = triton.testing.do_bench(lambda: torch.nn.functional.linear(x, w),
                                             return_mode="median")
            rate = (f"{2 * t * n * k / ours / 1e9:.0f} TFLOP/s" if t > 16
                    else f"{w.numel() * w.element_size() / ours / 1e6:.0f} GB/s")
            lines.append(f"| {name} | {t} | {n} x {k} | {ours * 1e3:.1f} | {cublas * 1e3:.1f} | "
                         f"{rate} |")
    return "\n".join(lines)
