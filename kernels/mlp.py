"""The SwiGLU MLP, silu(x W_gate^T) * (x W_up^T) W_down^T, and at decode one launch for all of it.

As two kernels (kernels.gate_up_silu, then kernels.linear's split-K GEMV for w2) each pays a
ramp before its first weight bytes arrive and a tail after its last (NOTES.md, session 6: the
w2 GEMV streams at 3.8 TB/s on an H200, the 1B shape's at 2.9). The down projection needs no
more than the intermediate columns it multiplies, so one program can own a slice of them end
to end: it streams its gate and up rows, applies SiLU-and-multiply in registers, then streams
the w2 columns of the same slice and writes its fp32 share of every output column. No program
waits for another until the sum: after a grid barrier (kernels/grid_barrier.py) each program
adds up all shares of a few output columns, in a fixed order.

A grid barrier needs every program resident at once, so the grid is at most one program per
SM, each slice as wide as that takes. The interpreter runs programs one at a time and cannot
pass a barrier: there the sum is a second launch of the same kernel. LLAMA_TRITON_FUSED_MLP
switches the fused path (A/B runs); prefill and more than 16 rows take the two kernels."""
import torch
import triton
import triton.language as tl

from .dispatch import dot_precision, interpreting, sm_count, switched_on, tune, use_triton
from .gate_up_silu import gate_up_silu
from .grid_barrier import barrier_state, grid_barrier
from .linear import DECODE_MAX_ROWS, linear
from .pdl import pdl_args, pdl_release, pdl_wait

FUSED_MLP = False  # off until measured on the GPU against the two kernels


def mlp_ops(x, w13, w2, sum_later=False):
    """The two-kernel MLP (any row count, any device); sum_later as in kernels.linear."""
    return linear(gate_up_silu(x, w13), w2, sum_later=sum_later)


def mlp(x, w13, w2, sum_later=False):
    """x [T, H], w13 [2I, H] (gate rows then up rows), w2 [H, I] -> [T, H] in x.dtype.
    sum_later: the caller hands the result to kernels.rmsnorm, which may then get the w2
    GEMV's split-K partials (only from the two-kernel path)."""
    if (use_triton(x) and 0 < x.shape[0] <= DECODE_MAX_ROWS
            and switched_on("LLAMA_TRITON_FUSED_MLP", FUSED_MLP)):
        return mlp_decode_triton(x, w13, w2)
    return mlp_ops(x, w13, w2, sum_later)


def _configs():
    # (BLOCK_K of the gate+up loop, BLOCK_H of the w2 loop, warps, stages)
    shapes = [(64, 64, 4, 4), (128, 64, 4, 4), (64, 128, 4, 4), (128, 128, 4, 3),
              (64, 64, 8, 4), (128, 128, 8, 3), (256, 64, 4, 3), (32, 128, 4, 4)]
    return tune([triton.Config({"BLOCK_K": k, "BLOCK_H": h}, num_warps=w, num_stages=s)
                 for k, h, w, s in shapes], triton.Config({"BLOCK_K": 32, "BLOCK_H": 32}))


@triton.jit
def _slice_shares(x_ptr, w13_ptr, w2_ptr, part_ptr, M, H, I, sxm, s13, s2n, s2j, pid,
                  DOT_PREC: tl.constexpr, PDL: tl.constexpr, SLICE: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's intermediate columns [pid * SLICE, +SLICE): silu(gate) * up from the fp32
    accumulators, rounded to x's type as the two-kernel path stores it, then its fp32 share of
    every output column into part[pid]."""
    rm = tl.arange(0, 16)  # rows padded to tl.dot's minimum
    rj = pid * SLICE + tl.arange(0, SLICE)
    rk = tl.arange(0, BLOCK_K)
    gate_rows = w13_ptr + rj[None, :].to(tl.int64) * s13
    up_rows = w13_ptr + (I + rj)[None, :].to(tl.int64) * s13  # up row j is w13 row I + j
    g = tl.zeros((16, SLICE), dtype=tl.float32)
    u = tl.zeros((16, SLICE), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < H), other=0.0)
        w_mask = (rj[None, :] < I) & (kk[:, None] < H)
        g += tl.dot(x, tl.load(gate_rows + kk[:, None], mask=w_mask, other=0.0),
                    input_precision=DOT_PREC)
        u += tl.dot(x, tl.load(up_rows + kk[:, None], mask=w_mask, other=0.0),
                    input_precision=DOT_PREC)
    y = (g / (1.0 + tl.exp(-g)) * u).to(x_ptr.dtype.element_ty)
    rn = tl.arange(0, BLOCK_H)
    share = part_ptr + pid * M * H + rm[:, None] * H
    for n0 in range(0, H, BLOCK_H):
        nn = n0 + rn
        # the tile's element (j, n) is w2[n, j]
        w = tl.load(w2_ptr + nn[None, :].to(tl.int64) * s2n + rj[:, None].to(tl.int64) * s2j,
                    mask=(nn[None, :] < H) & (rj[:, None] < I), other=0.0)
        acc = tl.dot(y, w, input_precision=DOT_PREC)
        tl.store(share + nn[None, :], acc, mask=(rm[:, None] < M) & (nn[None, :] < H))
    pdl_release(PDL)


@triton.jit
def _sum_shares(part_ptr, out_ptr, M, H, som, pid, n_programs, P_POW2: tl.constexpr,
                RB: tl.constexpr):
    """Output columns [pid * RB, +RB): every program's share, summed in one fixed order."""
    rp = tl.arange(0, P_POW2)
    cols = pid * RB + tl.arange(0, RB)
    mask = (rp[:, None] < n_programs) & (cols[None, :] < H)
    for m in range(0, M):
        # .cg reads L2: other SMs wrote these, and this SM's L1 may hold an older call's
        shares = tl.load(part_ptr + rp[:, None] * M * H + m * H + cols[None, :], mask=mask,
                         other=0.0, cache_modifier=".cg")
        total = tl.sum(shares, axis=0)
        tl.store(out_ptr + m * som + cols, total.to(out_ptr.dtype.element_ty), mask=cols < H)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "H", "I", "SLICE"])
@triton.jit
def _decode_mlp_kernel(x_ptr, w13_ptr, w2_ptr, part_ptr, out_ptr, barrier_ptr, M, H, I, M_BUCKET,
                       sxm, s13, s2n, s2j, som, DOT_PREC: tl.constexpr, PDL: tl.constexpr,
                       SLICE: tl.constexpr, P_POW2: tl.constexpr, RB: tl.constexpr,
                       SHARES: tl.constexpr, SUM: tl.constexpr, BARRIER: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    pdl_wait(PDL)
    if SHARES:
        _slice_shares(x_ptr, w13_ptr, w2_ptr, part_ptr, M, H, I, sxm, s13, s2n, s2j, pid, DOT_PREC,
                      PDL, SLICE, BLOCK_K, BLOCK_H)
    if BARRIER:
        grid_barrier(barrier_ptr, tl.num_programs(0))
    if SUM:
        _sum_shares(part_ptr, out_ptr, M, H, som, pid, tl.num_programs(0), P_POW2, RB)


def slice_width(I: int, sms: int) -> int:
    """Intermediate columns per program: a power of two (tl.arange), at least 16 (tl.dot), wide
    enough that the grid is at most one program per SM (the barrier needs all resident)."""
    return max(16, triton.next_power_of_2(triton.cdiv(I, sms)))


def mlp_decode_triton(x, w13, w2):
    x = x if x.stride(-1) == 1 else x.contiguous()
    w13 = w13 if w13.stride(-1) == 1 else w13.contiguous()
    M, H = x.shape
    I = w13.shape[0] // 2
    width = slice_width(I, sm_count(x.device))
    programs = triton.cdiv(I, width)
    # each program sums one block of output columns, so the sum too is a single pass
    rb = max(16, triton.next_power_of_2(triton.cdiv(H, programs)))
    part = torch.empty((programs, M, H), device=x.device, dtype=torch.float32)
    out = torch.empty((M, H), device=x.device, dtype=x.dtype)
    args = (x, w13, w2, part, out, barrier_state(x.device), M, H, I, triton.next_power_of_2(M),
            x.stride(0), w13.stride(0), w2.stride(0), w2.stride(1), out.stride(0))
    meta = dict(DOT_PREC=dot_precision(x.dtype), SLICE=width,
                P_POW2=triton.next_power_of_2(programs), RB=rb)
    if x.is_cuda and not interpreting():
        _decode_mlp_kernel[(programs,)](*args, **meta, SHARES=True, SUM=True, BARRIER=True,
                                        **pdl_args(x.device))
    else:  # no barrier in the interpreter: the sum is a second launch, in stream order
        _decode_mlp_kernel[(programs,)](*args, **meta, SHARES=True, SUM=False, BARRIER=False,
                                        PDL=False)
        _decode_mlp_kernel[(programs,)](*args, **meta, SHARES=False, SUM=True, BARRIER=False,
                                        PDL=False)
    return out
