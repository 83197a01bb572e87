"""Paged decode attention (one query row per sequence), flash-decoding style.

Grid (sequence, kv head, split). A program packs the GROUP query heads that share one KV head
into a BLOCK_H >= 16 row tile, so tl.dot runs on tensor cores and K/V are read once per group.
Each sequence's KV range is cut into NUM_SPLITS chunks of a fixed length derived from the
maximum length, never from seq_lens, so the grid is the same on every step (CUDA graphs);
programs whose chunk starts past the sequence's end do nothing. Each split keeps its output
and log-sum-exp in fp32; a second kernel merges them. The block table may be int32 or int64 with
any strides: the decode graphs pass a transposed view of their packed input (no copy per step)."""
import torch
import triton
import triton.language as tl

from .dispatch import dot_precision, interpreting, sm_count, tune

LOG2E = 1.4426950408889634
MIN_CHUNK = 256  # below this a split's fixed cost outweighs the parallelism it adds


@triton.autotune(
    configs=tune([triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
                  for n, w, s in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (32, 4, 3))],
                 triton.Config({"BLOCK_N": 16})),
    key=["HD", "GROUP", "NUM_SPLITS"],
)
@triton.jit
def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, lens_ptr, qsl_ptr, out_ptr, po_ptr,
                         plse_ptr, sqt, sqh, kcb, kcr, kch, vcb, vcr, vch, s_table, s_tcol, sot,
                         soh,                         scale_log2, chunk_len, block_size, n_heads, GROUP, HD, NUM_SPLITS,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         SPLIT: tl.constexpr, DOT_PREC: tl.constexpr):
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
        q = tl.load(q_ptr + q_row.to(tl.int64) * sqt + heads[:, None] * sqh + d[None, :],
                    mask=hmask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
        table = table_ptr + b.to(tl.int64) * s_table
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            pmask = pos < end
            blk = tl.load(table + (pos // block_size) * s_tcol, mask=pmask, other=0).to(tl.int64)
            row = (pos % block_size).to(tl.int64)
            kvmask = pmask[:, None] & dmask[None, :]
            k = tl.load(kc_ptr + blk[:, None] * kcb + row[:, None] * kcr + kvh * kch + d[None, :],
                        mask=kvmask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
            s = tl.where(pmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(vc_ptr + blk[:, None] * vcb + row[:, None] * vcr + kvh * vch + d[None, :],
                        mask=kvmask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        acc = acc / l_i[:, None]
        omask = hmask[:, None] & dmask[None, :]
        if SPLIT:
            part = (b * n_heads + heads).to(tl.int64) * NUM_SPLITS + split
            tl.store(po_ptr + part[:, None] * HD + d[None, :], acc, mask=omask)
            tl.store(plse_ptr + part, m_i + tl.log2(l_i), mask=hmask)
        else:
            tl.store(out_ptr + q_row.to(tl.int64) * sot + heads[:, None] * soh + d[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _decode_merge_kernel(po_ptr, plse_ptr, lens_ptr, qsl_ptr, out_ptr, sot, soh, chunk_len,
                         n_heads, HD, NUM_SPLITS, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    q_row = tl.load(qsl_ptr + b)
    n_q = tl.load(qsl_ptr + b + 1) - q_row
    if n_q > 0:
        n_valid = tl.cdiv(tl.load(lens_ptr + b), chunk_len)  # splits that ran for this sequence
        sp = tl.arange(0, BLOCK_S)
        smask = sp < n_valid
        d = tl.arange(0, BLOCK_D)
        part = (b * n_heads + h).to(tl.int64) * NUM_SPLITS + sp
        lse = tl.load(plse_ptr + part, mask=smask, other=float("-inf"))
        w = tl.where(smask, tl.exp2(lse - tl.max(lse, axis=0)), 0.0)
        o = tl.load(po_ptr + part[:, None] * HD + d[None, :],
                    mask=smask[:, None] & (d[None, :] < HD), other=0.0)
        res = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + q_row.to(tl.int64) * sot + h * soh + d, res.to(out_ptr.dtype.element_ty),
                 mask=d < HD)


def decode_splits(device, batch, n_kv, max_len):
    """Splits per sequence: enough programs to cover the SMs twice, chunks of >= MIN_CHUNK."""
    min_chunk = 16 if interpreting() else MIN_CHUNK
    want = triton.cdiv(2 * sm_count(device), max(1, batch * n_kv))
    return max(1, min(want, triton.cdiv(max_len, min_chunk)))


def paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                        max_seq_len=None, num_splits=None):
    B = seq_lens.shape[0]
    _, n_heads, hd = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    max_len = max_seq_len or block_tables.shape[1] * block_size
    splits = num_splits or decode_splits(q.device, B, n_kv, max_len)
    chunk_len = triton.cdiv(max_len, splits)
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    part_o = torch.empty((B, n_heads, splits, hd), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((B, n_heads, splits), device=q.device, dtype=torch.float32)
    block_d = triton.next_power_of_2(hd)
    _decode_split_kernel[(B, n_kv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_o, part_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        block_tables.stride(1), out.stride(0), out.stride(1), scale * LOG2E, chunk_len, block_size, n_heads, group, hd,
        splits, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        SPLIT=splits > 1, DOT_PREC=dot_precision(q.dtype))
    if splits > 1:
        _decode_merge_kernel[(B, n_heads)](
            part_o, part_lse, seq_lens, query_start_loc, out, out.stride(0), out.stride(1),
            chunk_len, n_heads, hd, splits, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            BLOCK_D=block_d)
    return out
