"""Greedy sampling on the device: argmax over the vocabulary of each row.

Two stages so a single row (batch 1) still spreads over many SMs: each program reduces one
chunk of the vocabulary to (max, index); a second program per row picks the best chunk.
Ties go to the lowest index, as torch.argmax does."""
import torch
import triton
import triton.language as tl

from .dispatch import use_triton
from .pdl import pdl_args, pdl_release, pdl_wait


def argmax_ref(logits):
    return torch.argmax(logits, dim=-1)


@triton.jit
def _chunk_argmax_kernel(x_ptr, val_ptr, idx_ptr, V, sx, n_chunks, BLOCK: tl.constexpr,
                         PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * sx + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    pdl_release(PDL)
    best = tl.max(x, axis=0)
    # first column holding the max (tl.argmax's tie-breaking differs between triton versions)
    idx = tl.min(tl.where(x == best, cols, V), axis=0)
    tl.store(val_ptr + row * n_chunks + chunk, best)
    tl.store(idx_ptr + row * n_chunks + chunk, idx)


@triton.jit
def _merge_argmax_kernel(val_ptr, idx_ptr, out_ptr, n_chunks, BLOCK_C: tl.constexpr,
                         PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < n_chunks
    pdl_wait(PDL)
    vals = tl.load(val_ptr + row * n_chunks + c, mask=mask, other=float("-inf"))
    idxs = tl.load(idx_ptr + row * n_chunks + c, mask=mask, other=2**31 - 1)
    pdl_release(PDL)
    best = tl.max(vals, axis=0)
    # chunks are in column order, so the smallest index among the best chunks is the first max
    tl.store(out_ptr + row, tl.min(tl.where(vals == best, idxs, 2**31 - 1), axis=0).to(tl.int64))


def argmax_triton(logits, block=4096):
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    B, V = logits.shape
    block = min(block, triton.next_power_of_2(V))
    n_chunks = triton.cdiv(V, block)
    vals = torch.empty((B, n_chunks), device=logits.device, dtype=torch.float32)
    idxs = torch.empty((B, n_chunks), device=logits.device, dtype=torch.int32)
    out = torch.empty((B,), device=logits.device, dtype=torch.int64)
    pdl = pdl_args(logits.device)
    _chunk_argmax_kernel[(B, n_chunks)](logits, vals, idxs, V, logits.stride(0), n_chunks,
                                        BLOCK=block, **pdl)
    _merge_argmax_kernel[(B,)](vals, idxs, out, n_chunks,
                               BLOCK_C=max(triton.next_power_of_2(n_chunks), 2), **pdl)
    return out


def argmax(logits):
    """logits [B, V] -> int64 [B]."""
    if use_triton(logits):
        return argmax_triton(logits)
    return argmax_ref(logits)
