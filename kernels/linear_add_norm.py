"""h = x @ W.T + residual, then RMSNorm(h) * weight: what follows wo and w2 in every Llama block
(w2's norm is the next block's, or the final one). Returns (normed, h) like kernels.rmsnorm.

At decode (T <= 16 rows) it is one launch: each program of the GEMV adds the residual to its
columns and stores them, and the last program to finish (kernels.arrival) normalises the whole
rows, with the same arithmetic as the RMSNorm kernel. Measured on the H200, a launch and the gap
before it cost more than that tail (bench/RESULTS.md, 2026-12-02). Prefill runs the GEMM, then
the RMSNorm kernel."""
import torch
import triton
import triton.language as tl

from .arrival import arrival_counters, is_last_arrival
from .dispatch import dot_precision, use_triton
from .linear import DECODE_MAX_ROWS, decode_configs, gemv_tile, linear_ref, linear_triton
from .rmsnorm import normalise_row, rmsnorm_ref, rmsnorm_triton


def linear_add_norm_ref(x, weight, residual, norm_weight, eps):
    return rmsnorm_ref(linear_ref(x, weight), norm_weight, eps, residual)


@triton.autotune(configs=decode_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _decode_add_norm_kernel(x_ptr, w_ptr, r_ptr, h_ptr, nw_ptr, out_ptr, counter_ptr, M, N, K,
                            M_BUCKET, sxm, swn, srm, shm, som, eps, DOT_PREC: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.arange(0, 16)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = gemv_tile(x_ptr, w_ptr, M, N, K, sxm, swn, rn, DOT_PREC, BLOCK_N, BLOCK_K)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    r = tl.load(r_ptr + rm[:, None] * srm + rn[None, :], mask=mask, other=0.0)
    # rounded like torch's linear(x, w) + residual: the product to the dtype first, then the sum
    h = (acc.to(h_ptr.dtype.element_ty).to(tl.float32) + r.to(tl.float32))
    tl.store(h_ptr + rm[:, None] * shm + rn[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
    if is_last_arrival(counter_ptr, tl.num_programs(0)):
        cols = tl.arange(0, BLOCK_H)
        for m in range(0, M):
            row = tl.load(h_ptr + m * shm + cols, mask=cols < N, other=0.0, cache_modifier=".cg")
            normalise_row(row, nw_ptr, out_ptr + m * som, cols, cols < N, N, eps)


def linear_add_norm_triton(x, weight, residual, norm_weight, eps):
    M = x.shape[0]
    if M > DECODE_MAX_ROWS or M == 0:
        return rmsnorm_triton(linear_triton(x, weight), norm_weight, eps, residual)
    x, weight, residual = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, weight, residual))
    K = x.shape[1]
    N = weight.shape[0]
    h = torch.empty((M, N), device=x.device, dtype=x.dtype)
    out = torch.empty((M, N), device=x.device,
                      dtype=torch.promote_types(x.dtype, norm_weight.dtype))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    _decode_add_norm_kernel[grid](
        x, weight, residual, h, norm_weight, out, arrival_counters(x.device, 1), M, N, K,
        triton.next_power_of_2(M), x.stride(0), weight.stride(0), residual.stride(0), h.stride(0),
        out.stride(0), eps, DOT_PREC=dot_precision(x.dtype), BLOCK_H=triton.next_power_of_2(N))
    return out, h


def linear_add_norm(x, weight, residual, norm_weight, eps):
    """x [T, K], weight [N, K], residual [T, N] -> (norm(x @ W.T + residual) * norm_weight,
    x @ W.T + residual), the first in promote(x, norm_weight) dtype, the second in x's."""
    fn = linear_add_norm_triton if use_triton(x) else linear_add_norm_ref
    return fn(x, weight, residual, norm_weight, eps)
