"""The attention prologue of one block in one op: RMSNorm, the fused QKV projection, rotary on q
and k, and the write of k and v into the paged cache. Returns the rotated q.

At decode (T <= 16 rows) it is one GEMV launch instead of three (norm, GEMV, rotary + cache):
a program owns BLOCK_P columns of the first half of one head and the same columns of its second
half, the pairs that rotary mixes, so it can rotate its own accumulators and store them where
they belong: q into the output, k and v into their cache slots. Prefill (compute-bound) runs
kernels.linear's GEMM and kernels.rotary's kernel."""
import torch
import triton
import triton.language as tl

from .dispatch import dot_precision, tune, use_triton
from .linear import DECODE_MAX_ROWS, linear, linear_triton
from .rmsnorm import normed_tile, row_rstd
from .rotary import rotary_cache_write_ref, rotary_cache_write_triton


def _split_heads(qkv, n_q, n_kv):
    tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // (n_q + 2 * n_kv)
    q_size, kv_size = n_q * head_dim, n_kv * head_dim
    return (qkv[:, :q_size].view(tokens, n_q, head_dim),
            qkv[:, q_size:q_size + kv_size].view(tokens, n_kv, head_dim),
            qkv[:, q_size + kv_size:].view(tokens, n_kv, head_dim))


def qkv_rotary_ref(x, wqkv, norm, heads, rope, cache, positions, slot_mapping):
    q, k, v = _split_heads(linear(x, wqkv, norm=norm), *heads)
    rotary_cache_write_ref(q, k, v, positions, *rope, *cache, slot_mapping)
    return q


@triton.autotune(
    configs=tune([triton.Config({"BLOCK_P": p, "BLOCK_K": k}, num_warps=w, num_stages=s)
                  for p, k, w, s in ((16, 256, 4, 4), (16, 512, 4, 3), (16, 128, 2, 4),
                                     (32, 256, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4))],
                 triton.Config({"BLOCK_P": 16, "BLOCK_K": 32})),
    key=["M_BUCKET", "N_HEADS", "K", "HALF", "NORM"],
)
@triton.jit
def _decode_qkv_rotary_kernel(x_ptr, w_ptr, nw_ptr, q_ptr, kc_ptr, vc_ptr, pos_ptr, slot_ptr,
                              cos_ptr, sin_ptr, M, K, M_BUCKET, N_HEADS, NQ, NKV, HALF, sxm, swn,
                              sqt, sqh, kcb, kcr, kch, vcb, vcr, vch, s_cos, block_size, eps,
                              NORM: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_P: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    tiles = tl.cdiv(HALF, BLOCK_P)
    head = tl.program_id(0) // tiles
    j = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    rm = tl.arange(0, 16)  # rows padded to tl.dot's minimum
    rk = tl.arange(0, BLOCK_K)
    first = w_ptr + (head * 2 * HALF + j)[None, :].to(tl.int64) * swn
    second = first + HALF * swn
    if NORM:
        rstd = row_rstd(x_ptr, M, K, sxm, eps, BLOCK_K)
    acc1 = tl.zeros((16, BLOCK_P), dtype=tl.float32)
    acc2 = tl.zeros((16, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        if NORM:
            x = normed_tile(x, rstd, tl.load(nw_ptr + kk, mask=kk < K, other=0.0))
        w_mask = (j[None, :] < HALF) & (kk[:, None] < K)
        acc1 += tl.dot(x, tl.load(first + kk[:, None], mask=w_mask, other=0.0),
                       input_precision=DOT_PREC)
        acc2 += tl.dot(x, tl.load(second + kk[:, None], mask=w_mask, other=0.0),
                       input_precision=DOT_PREC)
    # rounded to the activations' dtype first, as the unfused GEMV's output would be
    x1 = acc1.to(x_ptr.dtype.element_ty).to(tl.float32)
    x2 = acc2.to(x_ptr.dtype.element_ty).to(tl.float32)
    rows = rm < M
    if head < NQ + NKV:  # q and k heads rotate; v heads do not
        pos = tl.load(pos_ptr + rm, mask=rows, other=0).to(tl.int64)
        angle = pos[:, None] * s_cos + j[None, :]
        c = tl.load(cos_ptr + angle, mask=rows[:, None] & (j[None, :] < HALF), other=0.0)
        s = tl.load(sin_ptr + angle, mask=rows[:, None] & (j[None, :] < HALF), other=0.0)
        x1, x2 = x1 * c - x2 * s, x2 * c + x1 * s
    if head < NQ:
        dst = q_ptr + rm[:, None].to(tl.int64) * sqt + head * sqh + j[None, :]
        keep = rows[:, None] & (j[None, :] < HALF)
    else:
        slot = tl.load(slot_ptr + rm, mask=rows, other=-1).to(tl.int64)
        keep = (rows & (slot >= 0))[:, None] & (j[None, :] < HALF)  # slot < 0: a padding row
        blk, row = slot // block_size, slot % block_size
        if head < NQ + NKV:
            dst = kc_ptr + (blk * kcb + row * kcr + (head - NQ) * kch)[:, None] + j[None, :]
        else:
            dst = vc_ptr + (blk * vcb + row * vcr + (head - NQ - NKV) * vch)[:, None] + j[None, :]
    tl.store(dst, x1.to(dst.dtype.element_ty), mask=keep)
    tl.store(dst + HALF, x2.to(dst.dtype.element_ty), mask=keep)


def _launch_decode(x, wqkv, norm, heads, rope, cache, positions, slot_mapping):
    n_q, n_kv = heads
    (cos, sin), (k_cache, v_cache) = rope, cache
    M, K = x.shape
    n_heads = n_q + 2 * n_kv
    half = wqkv.shape[0] // n_heads // 2
    q = torch.empty((M, n_q, 2 * half), device=x.device, dtype=x.dtype)
    norm_weight, eps = norm if norm is not None else (x, 0.0)
    grid = lambda meta: (n_heads * triton.cdiv(half, meta["BLOCK_P"]),)
    _decode_qkv_rotary_kernel[grid](
        x, wqkv, norm_weight, q, k_cache, v_cache, positions, slot_mapping, cos, sin,
        M, K, triton.next_power_of_2(M), n_heads, n_q, n_kv, half, x.stride(0), wqkv.stride(0),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), cos.stride(0), k_cache.shape[1],
        eps, NORM=norm is not None, DOT_PREC=dot_precision(x.dtype))
    return q


def qkv_rotary_triton(x, wqkv, norm, heads, rope, cache, positions, slot_mapping):
    x = x if x.stride(-1) == 1 else x.contiguous()
    for t in (wqkv, *rope, *cache):
        assert t.stride(-1) == 1, "qkv_rotary needs unit stride in the last dimension"
    assert rope[0].stride() == rope[1].stride()
    if x.shape[0] > DECODE_MAX_ROWS or x.shape[0] == 0:
        q, k, v = _split_heads(linear_triton(x, wqkv, norm=norm), *heads)
        rotary_cache_write_triton(q, k, v, positions, *rope, *cache, slot_mapping)
        return q
    return _launch_decode(x, wqkv, norm, heads, rope, cache, positions, slot_mapping)


def qkv_rotary(x, wqkv, norm, heads, rope, cache, positions, slot_mapping):
    """x [T, hidden]; wqkv [(n_q + 2 n_kv) * head_dim, hidden]; norm (weight, eps) or None;
    heads (n_q, n_kv); rope (cos, sin) tables; cache (k_cache, v_cache). Writes rotate(k) and v
    at slot_mapping (negative slots: nothing) and returns rotate(q) [T, n_q, head_dim]."""
    fn = qkv_rotary_triton if use_triton(x) else qkv_rotary_ref
    return fn(x, wqkv, norm, heads, rope, cache, positions, slot_mapping)
