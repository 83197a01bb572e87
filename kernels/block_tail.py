"""A Llama block after its attention, and the next block's head, as one decode launch:

    h1 = attn @ wo.T + residual             (phase 0)
    y  = silu(gate) * up of rmsnorm(h1)     (phase 1, w13 = gate rows then up rows)
    d  = y @ w2.T                           (phase 2; with a next block, h2 = d + h1)
    qkv = rmsnorm(h2) @ wqkv.T              (phase 3, the next block's, when it is on this device)

At batch-1 decode each of these GEMVs streams its weight once, and a 4 KB-64 KB activation is
all that passes between them. As separate kernels (kernels.linear, kernels.rmsnorm,
kernels.gate_up_silu: six launches a block) every boundary costs the next kernel's ramp up to
full bandwidth and the last programs' tail (NOTES.md, session 6: 3-4 us per split-K GEMV on an
H200). Here one program per SM runs all phases, a grid barrier (kernels/grid_barrier.py)
between them; each program computes the RMSNorm of the whole row itself (a few KB from L2) and
owns one contiguous strip of each weight's output rows, so every SM streams an equal share.

The interpreter runs programs one at a time and cannot pass a barrier: there each phase is its
own launch of the same kernel. block_tail_ops is the same arithmetic from the separate kernels
(the path off the GPU, above 16 rows, and with LLAMA_TRITON_BLOCK_TAIL=0)."""
import os

import torch
import triton
import triton.language as tl

from .dispatch import dot_precision, interpreting, sm_count, switched_on, use_triton
from .gate_up_silu import gate_up_silu
from .grid_barrier import barrier_state, grid_barrier
from .linear import DECODE_MAX_ROWS, linear
from .pdl import pdl_args, pdl_release, pdl_wait
from .rmsnorm import rmsnorm

TILE_BYTES = 16384  # weight bytes a program loads per pipeline stage and operand (w13: two)


def block_tail_ops(attn, residual, wo, ffn_norm, w13, w2, eps, next_norm=None, next_wqkv=None):
    """The block's tail from the separate ops. Returns (next qkv, h2) with a next block, else
    (d, h1): the block's output and the residual it is still to be added to."""
    hidden = linear(attn, wo, sum_later=True)
    x, h1 = rmsnorm(hidden, ffn_norm, eps, residual)
    d = linear(gate_up_silu(x, w13), w2, sum_later=next_wqkv is not None)
    if next_wqkv is None:
        return d, h1
    x, h2 = rmsnorm(d, next_norm, eps, h1)
    return linear(x, next_wqkv), h2


def block_tail(attn, residual, wo, ffn_norm, w13, w2, eps, next_norm=None, next_wqkv=None):
    """attn [T, q_size] (the attention output), residual [T, H]; weights as in the Llama block.
    Returns (next block's qkv [T, q + 2 kv], h2) when next_wqkv is given, else (d, h1)."""
    if (use_triton(attn) and 0 < attn.shape[0] <= DECODE_MAX_ROWS
            and switched_on("LLAMA_TRITON_BLOCK_TAIL", True)):
        return block_tail_triton(attn, residual, wo, ffn_norm, w13, w2, eps, next_norm,
                                 next_wqkv)
    return block_tail_ops(attn, residual, wo, ffn_norm, w13, w2, eps, next_norm, next_wqkv)


@triton.jit
def _row_rstd(h_ptr, sh, M, H, eps, BLOCK_K: tl.constexpr):
    """1 / rms of rows 0..M-1 of h (16 rows, the padding ones unused)."""
    rm = tl.arange(0, 16)
    rk = tl.arange(0, BLOCK_K)
    squares = tl.zeros((16,), tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + rk
        h = tl.load(h_ptr + rm[:, None] * sh + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < H), other=0.0).to(tl.float32)
        squares += tl.sum(h * h, axis=1)
    return tl.rsqrt(squares / H + eps)


@triton.jit
def _strip(x_ptr, sx, M, K, rstd, nw_ptr, w_ptr, sw, up_rows, n_lo, n_hi, eps,
           NORM: tl.constexpr, UP: tl.constexpr, DOT_PREC: tl.constexpr,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LATE_RSTD: tl.constexpr = False):
    """x @ w[n_lo:n_hi].T for x's rows 0..M-1 over all of K, as fp32 [16, BLOCK_N]; with UP
    also x @ w[up_rows + n_lo : up_rows + n_hi].T. With NORM, x is first normalised as
    kernels.rmsnorm does: (x * rstd) rounded to x's type, times the weight nw, rounded."""
    act = x_ptr.dtype.element_ty
    rm = tl.arange(0, 16)  # rows padded to tl.dot's minimum
    rn = n_lo + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rows = w_ptr + rn[None, :].to(tl.int64) * sw
    up = rows + up_rows * sw  # I * K: within int32 for any Llama shape
    acc = tl.zeros((16, BLOCK_N), tl.float32)
    acc_up = tl.zeros((16, BLOCK_N), tl.float32)
    squares = tl.zeros((16,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sx + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        if NORM:
            nw = tl.load(nw_ptr + kk, mask=kk < K, other=0.0).to(tl.float32)
            if LATE_RSTD:
                xf = x.to(tl.float32)
                squares += tl.sum(xf * xf, axis=1)
                x = (xf * nw[None, :]).to(act)
            else:
                x = ((x.to(tl.float32) * rstd[:, None]).to(act).to(tl.float32)
                     * nw[None, :]).to(act)
        w_mask = (rn[None, :] < n_hi) & (kk[:, None] < K)
        acc += tl.dot(x, tl.load(rows + kk[:, None], mask=w_mask, other=0.0),
                      input_precision=DOT_PREC)
        if UP:
            acc_up += tl.dot(x, tl.load(up + kk[:, None], mask=w_mask, other=0.0),
                             input_precision=DOT_PREC)
    if NORM and LATE_RSTD:
        late = tl.rsqrt(squares / K + eps)
        acc = acc * late[:, None]
        acc_up = acc_up * late[:, None]
    return acc, acc_up


@triton.jit
def _rows_columns(M, n_lo, n_hi, BLOCK_N: tl.constexpr):
    rm = tl.arange(0, 16)
    rn = n_lo + tl.arange(0, BLOCK_N)
    return rm[:, None], rn[None, :], (rm[:, None] < M) & (rn[None, :] < n_hi)


@triton.jit
def _store(out_ptr, s_out, val, M, n_lo, n_hi, BLOCK_N: tl.constexpr):
    rm, rn, mask = _rows_columns(M, n_lo, n_hi, BLOCK_N)
    tl.store(out_ptr + rm * s_out + rn, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_sum(out_ptr, s_out, acc, add_ptr, s_add, M, n_lo, n_hi, BLOCK_N: tl.constexpr):
    """out = acc rounded to out's type, plus add's rows, rounded again: `y + residual` after a
    GEMV that returned y, as the separate kernels compute it."""
    rm, rn, mask = _rows_columns(M, n_lo, n_hi, BLOCK_N)
    act = out_ptr.dtype.element_ty
    add = tl.load(add_ptr + rm * s_add + rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rm * s_out + rn, (acc.to(act).to(tl.float32) + add).to(act), mask=mask)


@triton.jit
def _prefetch_l2(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_strip(w_ptr, sw, n_lo, n_hi, up_rows, UP: tl.constexpr, BLOCK_N: tl.constexpr,
                    LINES: tl.constexpr):
    """Ask L2 for the first LINES 128-byte lines of each of this program's next strip rows."""
    if LINES > 0:
        rn = tl.minimum(n_lo + tl.arange(0, BLOCK_N), n_hi - 1)
        line = tl.arange(0, LINES) * (128 // w_ptr.dtype.element_ty.primitive_bitwidth * 8)
        ptrs = w_ptr + rn[:, None].to(tl.int64) * sw + line[None, :]
        _prefetch_l2(ptrs)
        if UP:
            _prefetch_l2(ptrs + up_rows * sw)


@triton.jit
def _strip_bounds(N):
    """This program's output rows of an N-row weight: an equal share, to within one row."""
    p = tl.program_id(0)
    n_programs = tl.num_programs(0)
    return p * N // n_programs, (p + 1) * N // n_programs


@triton.jit
def _block_tail_kernel(attn_ptr, res_ptr, wo_ptr, h1_ptr, fnw_ptr, w13_ptr, y_ptr, w2_ptr, d_ptr,
                       anw_ptr, wqkv_ptr, qkv_ptr, state_ptr, M, H, KQ, I, NQKV, s_attn, s_res,
                       s_wo, s_w13, s_w2, s_wqkv, eps, DOT_PREC: tl.constexpr,
                       PDL: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
                       BARRIER: tl.constexpr, NEXT: tl.constexpr,
                       BN_O: tl.constexpr, BK_O: tl.constexpr, BN_GU: tl.constexpr,
                       BK_GU: tl.constexpr, BN_D: tl.constexpr, BK_D: tl.constexpr,
                       BN_QKV: tl.constexpr, BK_QKV: tl.constexpr, BK_NORM: tl.constexpr,
                       LATE_RSTD: tl.constexpr = False, PREFETCH: tl.constexpr = 0):
    # h1, y, d (h2 with NEXT) and qkv are contiguous: row strides H, I, H, NQKV
    no_rstd = tl.zeros((16,), tl.float32)
    pdl_wait(PDL)
    if FIRST <= 0 and 0 <= LAST:
        lo, hi = _strip_bounds(H)
        acc, _ = _strip(attn_ptr, s_attn, M, KQ, no_rstd, fnw_ptr, wo_ptr, s_wo, 0, lo, hi, eps,
                        NORM=False, UP=False, DOT_PREC=DOT_PREC, BLOCK_N=BN_O, BLOCK_K=BK_O)
        if LAST == 0:
            pdl_release(PDL)
        _store_sum(h1_ptr, H, acc, res_ptr, s_res, M, lo, hi, BN_O)
    if BARRIER and FIRST <= 0 and 1 <= LAST:
        lo, hi = _strip_bounds(I)
        _prefetch_strip(w13_ptr, s_w13, lo, hi, I, True, BN_GU, PREFETCH)
        grid_barrier(state_ptr, tl.num_programs(0))
    if FIRST <= 1 and 1 <= LAST:
        lo, hi = _strip_bounds(I)
        rstd = no_rstd if LATE_RSTD else _row_rstd(h1_ptr, H, M, H, eps, BK_NORM)
        gate, up = _strip(h1_ptr, H, M, H, rstd, fnw_ptr, w13_ptr, s_w13, I, lo, hi, eps,
                          NORM=True, UP=True, DOT_PREC=DOT_PREC, BLOCK_N=BN_GU, BLOCK_K=BK_GU,
                          LATE_RSTD=LATE_RSTD)
        if LAST == 1:
            pdl_release(PDL)
        # from the fp32 accumulators, as kernels.gate_up_silu: no rounding of gate and up
        _store(y_ptr, I, gate / (1.0 + tl.exp(-gate)) * up, M, lo, hi, BN_GU)
    if BARRIER and FIRST <= 1 and 2 <= LAST:
        lo, hi = _strip_bounds(H)
        _prefetch_strip(w2_ptr, s_w2, lo, hi, 0, False, BN_D, PREFETCH)
        grid_barrier(state_ptr, tl.num_programs(0))
    if FIRST <= 2 and 2 <= LAST:
        lo, hi = _strip_bounds(H)
        acc, _ = _strip(y_ptr, I, M, I, no_rstd, fnw_ptr, w2_ptr, s_w2, 0, lo, hi, eps,
                        NORM=False, UP=False, DOT_PREC=DOT_PREC, BLOCK_N=BN_D, BLOCK_K=BK_D)
        if LAST == 2:
            pdl_release(PDL)
        if NEXT:
            _store_sum(d_ptr, H, acc, h1_ptr, H, M, lo, hi, BN_D)
        else:
            _store(d_ptr, H, acc, M, lo, hi, BN_D)
    if BARRIER and FIRST <= 2 and 3 <= LAST:
        lo, hi = _strip_bounds(NQKV)
        _prefetch_strip(wqkv_ptr, s_wqkv, lo, hi, 0, False, BN_QKV, PREFETCH)
        grid_barrier(state_ptr, tl.num_programs(0))
    if FIRST <= 3 and 3 <= LAST:
        lo, hi = _strip_bounds(NQKV)
        rstd = no_rstd if LATE_RSTD else _row_rstd(d_ptr, H, M, H, eps, BK_NORM)
        acc, _ = _strip(d_ptr, H, M, H, rstd, anw_ptr, wqkv_ptr, s_wqkv, 0, lo, hi, eps,
                        NORM=True, UP=False, DOT_PREC=DOT_PREC, BLOCK_N=BN_QKV, BLOCK_K=BK_QKV,
                        LATE_RSTD=LATE_RSTD)
        pdl_release(PDL)
        _store(qkv_ptr, NQKV, acc, M, lo, hi, BN_QKV)


def _tiles(n_rows, programs, elt):
    """(BLOCK_N, BLOCK_K) of one phase: the widest strip any program owns, and K tiles of about
    TILE_BYTES per operand (32 wide under the interpreter, which pays per element)."""
    block_n = max(16, triton.next_power_of_2(triton.cdiv(n_rows, programs)))
    if interpreting():
        return block_n, 32
    tile = int(os.environ.get("LLAMA_TRITON_TAIL_TILE", TILE_BYTES))
    block_k = triton.next_power_of_2(tile // (block_n * elt) + 1) // 2  # rounded down
    return block_n, min(512, max(32, block_k))


def _unit_rows(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def block_tail_triton(attn, residual, wo, ffn_norm, w13, w2, eps, next_norm=None,
                      next_wqkv=None):
    attn, residual = _unit_rows(attn), _unit_rows(residual)
    wo, w13, w2 = _unit_rows(wo), _unit_rows(w13), _unit_rows(w2)
    M, KQ = attn.shape
    H, I = residual.shape[1], w13.shape[0] // 2
    nxt = next_wqkv is not None
    wqkv = _unit_rows(next_wqkv) if nxt else wo  # an unread stand-in without a next block
    NQKV = wqkv.shape[0] if nxt else 0
    new = lambda n: torch.empty((M, n), device=attn.device, dtype=residual.dtype)
    h1, y, d = new(H), new(I), new(H)
    qkv = new(NQKV) if nxt else d
    programs = sm_count(attn.device) * int(os.environ.get("LLAMA_TRITON_TAIL_PER_SM", 1))
    elt = wo.element_size()
    bn_o, bk_o = _tiles(H, programs, elt)
    bn_gu, bk_gu = _tiles(I, programs, elt)
    bn_d, bk_d = _tiles(H, programs, elt)
    bn_qkv, bk_qkv = _tiles(max(NQKV, 1), programs, elt)
    args = (attn, residual, wo, h1, ffn_norm, w13, y, w2, d, next_norm if nxt else ffn_norm,
            wqkv, qkv, barrier_state(attn.device), M, H, KQ, I, NQKV, attn.stride(0),
            residual.stride(0), wo.stride(0), w13.stride(0), w2.stride(0), wqkv.stride(0), eps)
    meta = dict(DOT_PREC=dot_precision(attn.dtype), NEXT=nxt, BN_O=bn_o, BK_O=bk_o, BN_GU=bn_gu,
                BK_GU=bk_gu, BN_D=bn_d, BK_D=bk_d, BN_QKV=bn_qkv, BK_QKV=bk_qkv,
                BK_NORM=32 if interpreting() else 512,
                LATE_RSTD=os.environ.get("LLAMA_TRITON_TAIL_LATE", "0") == "1",
                PREFETCH=0 if interpreting() else int(os.environ.get("LLAMA_TRITON_TAIL_PREFETCH", 0)))
    last = 3 if nxt else 2
    only = os.environ.get("LLAMA_TRITON_TAIL_ONLY")
    if only is not None:  # timing one phase (or 'phased': each its own launch)
        phases = range(last + 1) if only == "phased" else [int(only)]
        for phase in phases:
            _block_tail_kernel[(programs,)](*args, FIRST=phase, LAST=phase, BARRIER=False,
                                            PDL=False, **meta,
                                            num_warps=int(os.environ.get("LLAMA_TRITON_TAIL_WARPS", 4)),
                                            num_stages=int(os.environ.get("LLAMA_TRITON_TAIL_STAGES", 4)))
    elif attn.is_cuda and not interpreting():
        _block_tail_kernel[(programs,)](*args, FIRST=0, LAST=last, BARRIER=True,
                                        num_warps=int(os.environ.get("LLAMA_TRITON_TAIL_WARPS", 4)),
                                        num_stages=int(os.environ.get("LLAMA_TRITON_TAIL_STAGES", 4)), **meta, **pdl_args(attn.device))
    else:  # no barrier in the interpreter: each phase is a launch, in stream order
        for phase in range(last + 1):
            _block_tail_kernel[(programs,)](*args, FIRST=phase, LAST=phase, BARRIER=False,
                                            PDL=False, **meta)
    return (qkv, d) if nxt else (d, h1)
