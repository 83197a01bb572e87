"""RMSNorm handed from one decode GEMV to the next, with no kernel of its own (kernels/NOTES.md,
session 7).

    h = x @ W.T + residual;  next GEMV's input = rmsnorm(h) * weight

The GEMV that makes h (wo, w2) finishes each column block in one program (the split-K sum's
last program, or the only one). That program already holds its columns of h, so it also stores
- h times the norm weight, rounded to h's type ("scaled"), and
- the fp32 sums of h^2 over fixed 16-column slots [n_slots, M], so that the slot count never
  depends on the tile the autotuner chose.
The GEMV that reads the norm's output (gate+up, wqkv) takes `scaled` as its x, sums the slots
before its K loop and scales its fp32 accumulator by 1/rms after it. Its K loop is unchanged:
no load and no arithmetic join it (what made the norm-in-the-loop attempts slow).

Rounding differs from kernels.rmsnorm's Hugging Face order (h / rms rounded, then times the
weight, rounded): here h times the weight is rounded and 1/rms scales the fp32 sum. In fp16,
h times the weight could overflow where h / rms would not, so this is for bf16 and fp32."""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

SLOT = 16  # columns per sum of squares: the smallest decode tile, so any tile holds whole slots


class NormHandoff(NamedTuple):
    """What a producing GEMV leaves for the next one: h times the norm weight [M, H], and the
    sums of h^2 over 16-column slots [cdiv(H, 16), M] in fp32."""
    scaled: torch.Tensor
    square_sums: torch.Tensor
    eps: float


def new_handoff(rows: int, hidden: int, dtype: torch.dtype, device, eps: float) -> NormHandoff:
    return NormHandoff(torch.empty((rows, hidden), device=device, dtype=dtype),
                       torch.empty((triton.cdiv(hidden, SLOT), rows), device=device,
                                   dtype=torch.float32), eps)


def handoff_ref(h: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> NormHandoff:
    """The handoff of a finished h, in PyTorch (tests and the reference path)."""
    rows, hidden = h.shape
    hf = h.to(torch.promote_types(h.dtype, torch.float32))  # float64 stays float64 in tests
    scaled = (hf * norm_weight.float()).to(h.dtype)
    pad = triton.cdiv(hidden, SLOT) * SLOT - hidden
    squares = torch.nn.functional.pad(hf * hf, (0, pad)).view(rows, -1, SLOT).sum(-1)
    return NormHandoff(scaled, squares.T.contiguous(), eps)


def rstd_ref(handoff: NormHandoff) -> torch.Tensor:
    """1 / rms of each row [M, 1], from the slot sums."""
    hidden = handoff.scaled.shape[1]
    return torch.rsqrt(handoff.square_sums.sum(0) / hidden + handoff.eps)[:, None]


def rms_scaled_ref(out: torch.Tensor, handoff: NormHandoff) -> torch.Tensor:
    """A GEMV's output on handoff.scaled, scaled by its rows' 1/rms in at least fp32."""
    return out.to(torch.promote_types(out.dtype, torch.float32)) * rstd_ref(handoff)


@triton.jit
def store_handoff(total, rm, rn, out_ptr, som, res_ptr, sr, nw_ptr, xs_ptr, sq_ptr, M, N,
                  BLOCK_N: tl.constexpr):
    """A column block's epilogue in the producing GEMV: total [16, BLOCK_N] fp32 -> h = total
    rounded + residual, rounded (as torch's `y + residual`); stores h, h * weight and the
    block's slot sums of h^2. rn starts at a multiple of BLOCK_N (itself a multiple of 16)."""
    act = out_ptr.dtype.element_ty
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    res = tl.load(res_ptr + rm[:, None] * sr + rn[None, :], mask=mask, other=0.0)
    h = (total.to(act).to(tl.float32) + res.to(tl.float32)).to(act)
    tl.store(out_ptr + rm[:, None] * som + rn[None, :], h, mask=mask)
    hf = h.to(tl.float32)
    nw = tl.load(nw_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(xs_ptr + rm[:, None] * N + rn[None, :], (hf * nw[None, :]).to(act), mask=mask)
    sums = tl.sum(tl.reshape(hf * hf, (16, BLOCK_N // 16, 16)), axis=2)
    slot = tl.program_id(0) * (BLOCK_N // 16) + tl.arange(0, BLOCK_N // 16)
    n_slots = tl.cdiv(N, 16)
    tl.store(sq_ptr + slot[None, :] * M + rm[:, None], sums,
             mask=(rm[:, None] < M) & (slot[None, :] < n_slots))


@triton.jit
def handoff_rstd(sq_ptr, M, H, eps, SLOTS: tl.constexpr):
    """1 / rms [16] of rows 0..M-1 (the padding rows' unused), from the producer's slot sums of
    an H-wide row."""
    rm = tl.arange(0, 16)
    slot = tl.arange(0, SLOTS)
    sums = tl.load(sq_ptr + slot[None, :] * M + rm[:, None],
                   mask=(rm[:, None] < M) & (slot[None, :] < tl.cdiv(H, 16)), other=0.0)
    return tl.rsqrt(tl.sum(sums, axis=1) / H + eps)
