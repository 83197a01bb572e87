"""Paged decode attention (one query row per sequence), flash-decoding style, in one launch.

Grid (sequence, kv head, split). A program packs the GROUP query heads that share one KV head
into a BLOCK_H >= 16 row tile, so tl.dot runs on tensor cores and K/V are read once per group.
Each sequence's KV range is cut into NUM_SPLITS chunks of a fixed length derived from the
maximum length, never from seq_lens, so the grid is the same on every step (CUDA graphs);
programs whose chunk starts past the sequence's end do nothing. Each split keeps its output
and log-sum-exp in fp32; the last split program of a (sequence, kv head) to finish, found with
an arrival counter, merges them and writes the output, so no second kernel is launched. Given
the step's new k and v (NewTokens), every program rotates its q heads itself, and the program
whose chunk holds the new position rotates k and writes k and v into the cache before it reads
that chunk: no rotary launch runs before this one. The
block table may be int32 or int64 with any strides: the decode graphs pass a transposed view of
their packed input (no copy per step)."""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .arrival import arrival_counters, is_last_arrival
from .attention_block import attend_kv_block
from .dispatch import dot_precision, interpreting, sm_count, tune
from .pdl import pdl_args, pdl_release, pdl_wait
from .rotary import rotate_pair

LOG2E = 1.4426950408889634
MIN_CHUNK = 256  # below this a split's fixed cost outweighs the parallelism it adds


@triton.jit
def _attend_chunk(q, kc_ptr, vc_ptr, table, kvh, start, end, kcb, kcr, kch, vcb, vcr, vch,
                  s_tcol, block_size, scale_log2, d, dmask, BLOCK_H: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Softmax-weighted V over positions [start, end): (output, log2-sum-exp) per head row."""
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < end
        m_i, l_i, acc = attend_kv_block(q, m_i, l_i, acc, pos, pmask, pmask[None, :], table,
                                        s_tcol, kc_ptr, vc_ptr, kvh, kcb, kcr, kch, vcb, vcr, vch,
                                        block_size, d, dmask, scale_log2, DOT_PREC)
    return acc / l_i[:, None], m_i + tl.log2(l_i)


@triton.jit
def _merge_partials(po_ptr, plse_ptr, parts, n_valid, hmask, d, dmask, n_heads, HD,
                    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Combine splits 0 .. n_valid-1 of one group's heads (parts: their rows in split 0).
    Always in split order, so the result does not depend on which program runs the merge."""
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for s in range(0, n_valid):
        part = parts + s * n_heads
        # .cg reads L2: other SMs wrote these, and this SM's L1 may hold lines of an older call
        lse = tl.load(plse_ptr + part, mask=hmask, other=0.0, cache_modifier=".cg")
        o = tl.load(po_ptr + part[:, None] * HD + d[None, :], mask=hmask[:, None] & dmask[None, :],
                    other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha[:, None] + w[:, None] * o
        l = l * alpha + w
        m = m_new
    return acc / l[:, None]


@triton.jit
def _rotated(ptrs, partner_ptrs, mask, c, s, lo):
    """Rotary embedding of the rows at ptrs, in fp32, by kernels/rotary.py's rotate_pair: an
    element of a head's first half (lo) is that pair's first output, one of the second half,
    whose partner is half a head back, the second."""
    x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(partner_ptrs, mask=mask, other=0.0).to(tl.float32)
    first, _ = rotate_pair(x, p, c, s)
    _, second = rotate_pair(p, x, c, s)
    return tl.where(lo, first, second)


@triton.jit
def _write_new_kv(k_row, v_row, kc_head, vc_head, slot_ptr, kcb, kcr, vcb, vcr, block_size, d,
                  partner, dmask, c, s, lo):
    """Rotate this token's k row of one KV head and write it and its v row into the cache."""
    slot = tl.load(slot_ptr).to(tl.int64)
    if slot >= 0:  # negative slots are padding rows: nothing to cache
        blk, row = slot // block_size, slot % block_size
        k = _rotated(k_row + d, k_row + partner, dmask, c, s, lo)
        tl.store(kc_head + blk * kcb + row * kcr + d, k.to(kc_head.dtype.element_ty), mask=dmask)
        v = tl.load(v_row + d, mask=dmask, other=0.0)
        tl.store(vc_head + blk * vcb + row * vcr + d, v.to(vc_head.dtype.element_ty), mask=dmask)
    # the program's own loads below read the slot just written: all threads' stores go first
    tl.debug_barrier()


@triton.autotune(
    configs=tune([triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                  for n, w, s in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (32, 4, 3))],
                 triton.Config({"BLOCK_N": 16})),
    key=["HD", "GROUP", "NUM_SPLITS"],
)
@triton.jit
def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, lens_ptr, qsl_ptr, out_ptr, po_ptr,
                         plse_ptr, counter_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr,
                         sqt, sqh, skt, skh, svt, svh, s_cos, kcb, kcr, kch, vcb, vcr, vch, s_table,
                         s_tcol, sot, soh, scale_log2, chunk_len, block_size, n_heads, GROUP, HD,
                         NUM_SPLITS, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_PREC: tl.constexpr,
                         NEW_KV: tl.constexpr, PDL: tl.constexpr):
    pdl_wait(PDL)  # everything below reads or writes what earlier kernels touch (kernels.pdl)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(qsl_ptr + b)
    n_q = tl.load(qsl_ptr + b + 1) - q_row
    seq_len = tl.load(lens_ptr + b)
    start = split * chunk_len
    if (n_q > 0) & (start < seq_len):
        end = tl.minimum(start + chunk_len, seq_len)
        h = tl.arange(0, BLOCK_H)
        heads = kvh * GROUP + h
        hmask = h < GROUP
        d = tl.arange(0, BLOCK_D)
        dmask = d < HD
        omask = hmask[:, None] & dmask[None, :]
        q_ptrs = q_ptr + q_row.to(tl.int64) * sqt + heads[:, None] * sqh
        if NEW_KV:
            pos = tl.load(pos_ptr + q_row).to(tl.int64)
            half = HD // 2
            lo = d < half
            partner = tl.where(lo, d + half, d - half)
            c = tl.load(cos_ptr + pos * s_cos + d % half, mask=dmask, other=0.0)
            s = tl.load(sin_ptr + pos * s_cos + d % half, mask=dmask, other=0.0)
            q = _rotated(q_ptrs + d[None, :], q_ptrs + partner[None, :], omask, c, s, lo)
            q = q.to(q_ptr.dtype.element_ty)  # rounded as if written back, like the reference
            n_run = tl.minimum(tl.cdiv(seq_len, chunk_len), NUM_SPLITS)
            if split == tl.minimum(pos // chunk_len, n_run - 1):  # the one program reading it
                _write_new_kv(k_ptr + q_row.to(tl.int64) * skt + kvh * skh,
                              v_ptr + q_row.to(tl.int64) * svt + kvh * svh,
                              kc_ptr + kvh * kch, vc_ptr + kvh * vch, slot_ptr + q_row, kcb, kcr,
                              vcb, vcr, block_size, d, partner, dmask, c, s, lo)
        else:
            q = tl.load(q_ptrs + d[None, :], mask=omask, other=0.0)
        table = table_ptr + b.to(tl.int64) * s_table
        o, lse = _attend_chunk(q, kc_ptr, vc_ptr, table, kvh, start, end, kcb, kcr, kch, vcb,
                               vcr, vch, s_tcol, block_size, scale_log2, d, dmask, BLOCK_H,
                               BLOCK_D, BLOCK_N, DOT_PREC)
        pdl_release(PDL)
        out = out_ptr + q_row.to(tl.int64) * sot + heads[:, None] * soh + d[None, :]
        if SPLIT:
            # splits that run for this sequence; the clamp keeps a length past max_seq_len from
            # waiting for a split that does not exist, which would leave its counter set for good
            n_valid = tl.minimum(tl.cdiv(seq_len, chunk_len), NUM_SPLITS)
            if n_valid > 1:
                parts = (b * NUM_SPLITS * n_heads + heads).to(tl.int64)  # [b, split, head] rows
                mine = parts + split * n_heads
                tl.store(po_ptr + mine[:, None] * HD + d[None, :], o, mask=omask)
                tl.store(plse_ptr + mine, lse, mask=hmask)
                if is_last_arrival(counter_ptr + b * tl.num_programs(1) + kvh, n_valid):
                    merged = _merge_partials(po_ptr, plse_ptr, parts, n_valid, hmask, d, dmask,
                                             n_heads, HD, BLOCK_H, BLOCK_D)
                    tl.store(out, merged.to(out_ptr.dtype.element_ty), mask=omask)
            else:
                tl.store(out, o.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            tl.store(out, o.to(out_ptr.dtype.element_ty), mask=omask)


def decode_splits(device, batch, n_kv, max_len):
    """Splits per sequence: enough programs to cover the SMs twice, chunks of >= MIN_CHUNK."""
    min_chunk = 16 if interpreting() else MIN_CHUNK
    want = triton.cdiv(2 * sm_count(device), max(1, batch * n_kv))
    return max(1, min(want, triton.cdiv(max_len, min_chunk)))


class NewTokens(NamedTuple):
    """This step's k and v rows (one token per sequence) with their positions, cache slots and
    the rotary tables: given to the decode kernel, it rotates q and k itself and writes k and v
    into the cache before attending, so no separate rotary launch runs before it."""
    k: torch.Tensor          # [T, n_kv, hd], not yet rotated
    v: torch.Tensor          # [T, n_kv, hd]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor      # [T], negative for padding rows
    cos: torch.Tensor        # [max_positions, hd // 2], float32
    sin: torch.Tensor


def paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                        max_seq_len=None, num_splits=None, new: NewTokens | None = None):
    B = seq_lens.shape[0]
    _, n_heads, hd = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    max_len = max_seq_len or block_tables.shape[1] * block_size
    splits = num_splits or decode_splits(q.device, B, n_kv, max_len)
    chunk_len = triton.cdiv(max_len, splits)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    # laid out [sequence, split, head], so a split's rows for one kv head's group are adjacent
    part_o = torch.empty((B, splits, n_heads, hd), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((B, splits, n_heads), device=q.device, dtype=torch.float32)
    counters = arrival_counters(q.device, B * n_kv)
    fresh, fresh_strides = _new_token_args(new, q)
    _decode_split_kernel[(B, n_kv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_o, part_lse,
        counters, *fresh, q.stride(0), q.stride(1), *fresh_strides, k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0), block_tables.stride(1), out.stride(0),
        out.stride(1), scale * LOG2E, chunk_len, block_size, n_heads, group, hd, splits,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=triton.next_power_of_2(hd),
        SPLIT=splits > 1, DOT_PREC=dot_precision(q.dtype), NEW_KV=new is not None,
        **pdl_args(q.device))
    return out


def _new_token_args(new: NewTokens | None, q: torch.Tensor) -> tuple[tuple, tuple]:
    """The kernel's (k, v, position, cos, sin, slot) pointers and (skt, skh, svt, svh, s_cos)
    strides; q and zeros, never read, without new tokens."""
    if new is None:
        return (q,) * 6, (0,) * 5
    for t in (new.k, new.v, new.cos, new.sin):
        assert t.stride(-1) == 1, "paged decode needs unit stride in the last dimension"
    assert new.cos.stride() == new.sin.stride()
    return ((new.k, new.v, new.positions, new.cos, new.sin, new.slots),
            (new.k.stride(0), new.k.stride(1), new.v.stride(0), new.v.stride(1),
             new.cos.stride(0)))
