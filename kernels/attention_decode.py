"""Paged decode attention (one query row per sequence), flash-decoding style, in one launch.

Grid (sequence, kv head, split). A program packs the GROUP query heads that share one KV head
into a BLOCK_H >= 16 row tile, so tl.dot runs on tensor cores and K/V are read once per group.
Each sequence's positions are cut into chunks of a fixed length (at most CHUNK); program
`split` of NUM_SPLITS takes chunks split, split + NUM_SPLITS, ..., so the grid depends on
neither seq_lens nor the step (CUDA graphs), every length is covered, and a long sequence keeps
all splits busy. Programs whose first chunk starts past the sequence's end do nothing. Each
split keeps its output and log-sum-exp in fp32; the last split program of a (sequence, kv
head) to finish, found with an arrival counter, merges them and writes the output, so no second
kernel is launched.

Given the step's new k and v (NewTokens), each sequence's last position is that new token:
every program rotates its q heads itself, the cache is read below the new position only, and
the program whose chunk holds the new position rotates k, writes k and v into the cache for
later steps and folds them in from registers. No rotary launch runs before this one, and the
cache rows it reads are older than the kernel before it (the QKV GEMV), so the first block of
them is loaded before the PDL wait. The block table may be int32 or int64 with any strides: the
decode graphs pass a transposed view of their packed input (no copy per step)."""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .arrival import arrival_counters, is_last_arrival
from .attention_block import attend_kv_block, fold_kv_block, load_kv_block
from .dispatch import dot_precision, interpreting, sm_count, tune
from .pdl import pdl_args, pdl_release, pdl_wait
from .rotary import rotate_pair

LOG2E = 1.4426950408889634
# Positions a program attends at a time: shorter chunks add parallelism for long sequences,
# longer ones cut a split's fixed cost. A program takes chunks split, split + splits, ...
CHUNK = 256
INTERPRETED_CHUNK = 16  # small enough that the CPU tests reach several splits


def _chunk_cap() -> int:
    return INTERPRETED_CHUNK if interpreting() else CHUNK


@triton.jit
def _attend_range(q, m_i, l_i, acc, lo, hi, table, s_tcol, kc_ptr, vc_ptr, kvh, kcb, kcr, kch,
                  vcb, vcr, vch, block_size, d, dmask, scale_log2, BLOCK_N: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """Fold the cache positions [lo, hi) into the running (max, sum, output)."""
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        pmask = pos < hi
        m_i, l_i, acc = attend_kv_block(q, m_i, l_i, acc, pos, pmask, pmask[None, :], table,
                                        s_tcol, kc_ptr, vc_ptr, kvh, kcb, kcr, kch, vcb, vcr, vch,
                                        block_size, d, dmask, scale_log2, DOT_PREC)
    return m_i, l_i, acc


@triton.jit
def _rescaled(m_i, score):
    """One more log2-score per row of a running softmax: the new max, the factor that rescales
    what was summed so far, and the new term's weight."""
    m_new = tl.maximum(m_i, score)
    return m_new, tl.exp2(m_i - m_new), tl.exp2(score - m_new)


@triton.jit
def _fold_new_token(q, m_i, l_i, acc, k, v, scale_log2):
    """Fold one position whose k and v rows [BLOCK_D], in the cache's type, are in registers,
    as fold_kv_block folds a block: fp32 scores, p rounded to v's type for the output."""
    s = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], axis=1) * scale_log2
    m_new, alpha, p = _rescaled(m_i, s)
    l_i = l_i * alpha + p
    acc = acc * alpha[:, None] + p.to(v.dtype).to(tl.float32)[:, None] * v.to(tl.float32)[None, :]
    return m_new, l_i, acc


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
        m_new, alpha, w = _rescaled(m, lse)
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
def _new_kv(k_row, v_row, kc_head, vc_head, slot, writes, kcb, kcr, vcb, vcr, block_size, d,
            partner, dmask, c, s, lo):
    """This token's k row of one KV head rotated, and its v row, in the cache's type; written
    into the cache at slot if `writes` (negative slots are padding rows: nothing to cache)."""
    k = _rotated(k_row + d, k_row + partner, dmask, c, s, lo).to(kc_head.dtype.element_ty)
    v = tl.load(v_row + d, mask=dmask, other=0.0).to(vc_head.dtype.element_ty)
    if writes & (slot >= 0):
        blk, row = slot // block_size, slot % block_size
        tl.store(kc_head + blk * kcb + row * kcr + d, k, mask=dmask)
        tl.store(vc_head + blk * vcb + row * vcr + d, v, mask=dmask)
    return k, v


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
    if not NEW_KV:
        pdl_wait(PDL)  # the kernel before may have written any cache row (kernels.pdl)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_row = tl.load(qsl_ptr + b)
    n_q = tl.load(qsl_ptr + b + 1) - q_row
    seq_len = tl.load(lens_ptr + b)
    # with new tokens, the last position is this step's token: its k and v come in registers
    cached = seq_len
    if NEW_KV:
        cached = seq_len - 1
    start = split * chunk_len
    active = (n_q > 0) & (start < seq_len)
    h = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + h
    hmask = h < GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < HD
    omask = hmask[:, None] & dmask[None, :]
    table = table_ptr + b.to(tl.int64) * s_table
    # The first block of the first chunk. With new tokens, the kernel before (the QKV GEMV)
    # writes only q, k and v: the graph's inputs, the rotary tables and the cache rows below
    # the new position are older, so they are read before the PDL wait.
    first_end = tl.minimum(start + chunk_len, cached)
    pos0 = start + tl.arange(0, BLOCK_N)
    mask0 = pos0 < tl.where(active, first_end, 0)  # nothing for a program without work
    k0, v0 = load_kv_block(pos0, mask0, table, s_tcol, kc_ptr, vc_ptr, kvh, kcb, kcr, kch, vcb,
                           vcr, vch, block_size, d, dmask)
    if NEW_KV:
        row = tl.where(active, q_row, 0)  # a padding sequence's q_row may be past the end
        pos = tl.load(pos_ptr + row).to(tl.int64)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        half = HD // 2
        lo = d < half
        partner = tl.where(lo, d + half, d - half)
        c = tl.load(cos_ptr + pos * s_cos + d % half, mask=dmask, other=0.0)
        s = tl.load(sin_ptr + pos * s_cos + d % half, mask=dmask, other=0.0)
        pdl_wait(PDL)
    if active:
        q_ptrs = q_ptr + q_row.to(tl.int64) * sqt + heads[:, None] * sqh
        if NEW_KV:
            q = _rotated(q_ptrs + d[None, :], q_ptrs + partner[None, :], omask, c, s, lo)
            q = q.to(q_ptr.dtype.element_ty)  # rounded as if written back, like the reference
            # every program loads the new k and v beside q (one round trip); the one whose
            # chunk holds the new token writes them to the cache and folds them in
            owns_new = split == (cached // chunk_len) % NUM_SPLITS
            k_new, v_new = _new_kv(k_ptr + q_row.to(tl.int64) * skt + kvh * skh,
                                   v_ptr + q_row.to(tl.int64) * svt + kvh * svh,
                                   kc_ptr + kvh * kch, vc_ptr + kvh * vch, slot, owns_new, kcb,
                                   kcr, vcb, vcr, block_size, d, partner, dmask, c, s, lo)
        else:
            q = tl.load(q_ptrs + d[None, :], mask=omask, other=0.0)
        m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
        if start < first_end:  # else this chunk holds only the new token: no -inf - -inf
            m_i, l_i, acc = fold_kv_block(q, m_i, l_i, acc, k0, v0, mask0[None, :], scale_log2,
                                          DOT_PREC)
        m_i, l_i, acc = _attend_range(q, m_i, l_i, acc, start + BLOCK_N, first_end, table, s_tcol,
                                      kc_ptr, vc_ptr, kvh, kcb, kcr, kch, vcb, vcr, vch,
                                      block_size, d, dmask, scale_log2, BLOCK_N, DOT_PREC)
        # a program takes chunks split, split + NUM_SPLITS, ...: any length is covered
        for c0 in range(start + NUM_SPLITS * chunk_len, cached, NUM_SPLITS * chunk_len):
            m_i, l_i, acc = _attend_range(q, m_i, l_i, acc, c0, tl.minimum(c0 + chunk_len, cached),
                                          table, s_tcol, kc_ptr, vc_ptr, kvh, kcb, kcr, kch, vcb,
                                          vcr, vch, block_size, d, dmask, scale_log2, BLOCK_N,
                                          DOT_PREC)
        if NEW_KV:
            if owns_new:
                m_i, l_i, acc = _fold_new_token(q, m_i, l_i, acc, k_new, v_new, scale_log2)
        pdl_release(PDL)
        o = acc / l_i[:, None]
        lse = m_i + tl.log2(l_i)
        out = out_ptr + q_row.to(tl.int64) * sot + heads[:, None] * soh + d[None, :]
        if SPLIT:
            n_valid = tl.minimum(tl.cdiv(seq_len, chunk_len), NUM_SPLITS)  # programs with work
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
    """Programs per (sequence, kv head): enough to cover the SMs twice, no more than there are
    chunks in max_len."""
    want = triton.cdiv(2 * sm_count(device), max(1, batch * n_kv))
    return max(1, min(want, triton.cdiv(max_len, _chunk_cap())))


class NewTokens(NamedTuple):
    """This step's k and v rows (one token per sequence) with their positions, cache slots and
    the rotary tables: given to the decode kernel, it rotates q and k itself, writes k and v
    into the cache for later steps and attends to them from registers, so no separate rotary
    launch runs before it."""
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
    chunk_len = min(_chunk_cap(), triton.cdiv(max_len, splits))
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
