"""One step of the online softmax that both paged attention kernels (prefill and decode) run:
the K and V rows of BLOCK_N cache positions, gathered through the block table, folded into a
running (max, sum, output) per query row, in fp32 and base 2."""
import triton
import triton.language as tl


@triton.jit
def load_kv_block(pos, pmask, table, s_tcol, kc_ptr, vc_ptr, kvh, kcb, kcr, kch, vcb, vcr, vch,
                  block_size, d, dmask):
    """The K and V rows [BLOCK_N, BLOCK_D] of cache positions pos (pmask: which exist), gathered
    through table, the sequence's block table, s_tcol apart."""
    blk = tl.load(table + (pos // block_size) * s_tcol, mask=pmask, other=0).to(tl.int64)
    row = (pos % block_size).to(tl.int64)
    kvmask = pmask[:, None] & dmask[None, :]
    k = tl.load(kc_ptr + blk[:, None] * kcb + row[:, None] * kcr + kvh * kch + d[None, :],
                mask=kvmask, other=0.0)
    v = tl.load(vc_ptr + blk[:, None] * vcb + row[:, None] * vcr + kvh * vch + d[None, :],
                mask=kvmask, other=0.0)
    return k, v


@triton.jit
def fold_kv_block(q, m_i, l_i, acc, k, v, score_mask, scale_log2, DOT_PREC: tl.constexpr):
    """Fold K/V rows into the running (max, sum, output); score_mask [rows, BLOCK_N]: which
    position each query row may see."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
    s = tl.where(score_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def attend_kv_block(q, m_i, l_i, acc, pos, pmask, score_mask, table, s_tcol, kc_ptr, vc_ptr, kvh,
                    kcb, kcr, kch, vcb, vcr, vch, block_size, d, dmask, scale_log2,
                    DOT_PREC: tl.constexpr):
    """pos [BLOCK_N]: the positions, pmask which exist; score_mask [rows, BLOCK_N]: which each
    query row may see. table: the sequence's block table, s_tcol apart. Returns m_i, l_i, acc."""
    k, v = load_kv_block(pos, pmask, table, s_tcol, kc_ptr, vc_ptr, kvh, kcb, kcr, kch, vcb, vcr,
                         vch, block_size, d, dmask)
    return fold_kv_block(q, m_i, l_i, acc, k, v, score_mask, scale_log2, DOT_PREC)
