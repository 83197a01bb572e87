"""Paged causal attention for prefill and mixed batches, flash-attention style.

Grid (query tile, sequence, head). A sequence's n query rows are its last n positions, so a
prompt that extends a cached prefix attends to the prefix through the same block table. Each
program walks the KV positions up to its last row's position in BLOCK_N steps, with an online
softmax in fp32; the grid depends on max_query_len, which is fine since prefill is not captured."""
import torch
import triton
import triton.language as tl

from .attention_block import attend_kv_block
from .dispatch import dot_precision, tune

LOG2E = 1.4426950408889634


@triton.autotune(
    configs=tune([triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                  for m, n, w, s in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3),
                                     (64, 32, 4, 2), (32, 64, 4, 2))],
                 triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})),
    key=["HD", "GROUP", "MAX_Q_BUCKET"],
)
@triton.jit
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, lens_ptr, qsl_ptr, out_ptr,
                    sqt, sqh, kcb, kcr, kch, vcb, vcr, vch, s_table, sot, soh,
                    scale_log2, block_size, GROUP, HD, MAX_Q_BUCKET,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(qsl_ptr + b)
    n_q = tl.load(qsl_ptr + b + 1) - q_start
    if tile * BLOCK_M < n_q:
        seq_len = tl.load(lens_ptr + b)
        i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        imask = i < n_q
        q_pos = seq_len - n_q + i
        d = tl.arange(0, BLOCK_D)
        dmask = d < HD
        rows = (q_start + i).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * sqt + h * sqh + d[None, :],
                    mask=imask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        table = table_ptr + b.to(tl.int64) * s_table
        kv_end = tl.minimum(seq_len, seq_len - n_q + (tile + 1) * BLOCK_M)  # causal bound
        for n0 in range(0, kv_end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            pmask = pos < kv_end
            visible = pmask[None, :] & (pos[None, :] <= q_pos[:, None])  # causal
            m_i, l_i, acc = attend_kv_block(q, m_i, l_i, acc, pos, pmask, visible, table, 1,
                                            kc_ptr, vc_ptr, kvh, kcb, kcr, kch, vcb, vcr, vch,
                                            block_size, d, dmask, scale_log2, DOT_PREC)
        acc = acc / l_i[:, None]
        tl.store(out_ptr + rows[:, None] * sot + h * soh + d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=imask[:, None] & dmask[None, :])


def paged_prefill_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                         max_query_len, scale):
    B = seq_lens.shape[0]
    _, n_heads, hd = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    grid = lambda meta: (triton.cdiv(max_query_len, meta["BLOCK_M"]), B, n_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), scale * LOG2E, block_size, n_heads // n_kv, hd,
        min(triton.next_power_of_2(max_query_len), 4096),
        BLOCK_D=triton.next_power_of_2(hd), DOT_PREC=dot_precision(q.dtype))
    return out
