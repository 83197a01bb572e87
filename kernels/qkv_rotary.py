"""The fused QKV projection, then rotary on q and k and the write of k and v into the paged
cache: qkv = x @ Wqkv.T, split into heads. Returns the rotated q, a view into qkv.

At decode (T <= 16 rows) it is one launch: the GEMV's programs store their qkv columns and the
last one to finish (kernels.arrival) runs kernels.rotary's per-token body over all the rows.
Prefill runs the GEMM, then the rotary kernel (one program per token)."""
import torch
import triton
import triton.language as tl

from .arrival import arrival_counters, is_last_arrival
from .dispatch import dot_precision, use_triton
from .linear import DECODE_MAX_ROWS, decode_configs, gemv_tile, linear_ref, linear_triton
from .rotary import rotary_cache_write_ref, rotary_cache_write_triton, rotary_token


def split_heads(qkv, n_q, n_kv):
    """[T, (n_q + 2 n_kv) * head_dim] -> q, k, v views [T, heads, head_dim]."""
    tokens = qkv.shape[0]
    head_dim = qkv.shape[1] // (n_q + 2 * n_kv)
    q_end, k_end = n_q * head_dim, (n_q + n_kv) * head_dim
    return (qkv[:, :q_end].view(tokens, n_q, head_dim),
            qkv[:, q_end:k_end].view(tokens, n_kv, head_dim),
            qkv[:, k_end:].view(tokens, n_kv, head_dim))


def qkv_rotary_ref(x, wqkv, heads, rope, cache, positions, slot_mapping):
    q, k, v = split_heads(linear_ref(x, wqkv), *heads)
    rotary_cache_write_ref(q, k, v, positions, *rope, *cache, slot_mapping)
    return q


@triton.autotune(configs=decode_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _decode_qkv_rotary_kernel(x_ptr, w_ptr, qkv_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr,
                              slot_ptr, counter_ptr, M, N, K, M_BUCKET, sxm, swn, s_qkv, s_cos,
                              kcb, kcr, kch, vcb, vcr, vch, block_size, NQ, NKV, HALF,
                              DOT_PREC: tl.constexpr, BLOCK_HQ: tl.constexpr,
                              BLOCK_HKV: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.arange(0, 16)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = gemv_tile(x_ptr, w_ptr, M, N, K, sxm, swn, rn, DOT_PREC, BLOCK_N, BLOCK_K)
    tl.store(qkv_ptr + rm[:, None] * s_qkv + rn[None, :], acc.to(qkv_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
    if is_last_arrival(counter_ptr, tl.num_programs(0)):
        hd = 2 * HALF
        k_ptr, v_ptr = qkv_ptr + NQ * hd, qkv_ptr + (NQ + NKV) * hd
        for t in range(0, M):
            rotary_token(t, qkv_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr,
                         slot_ptr, s_qkv, hd, s_qkv, hd, s_qkv, hd, s_cos, kcb, kcr, kch, vcb,
                         vcr, vch, block_size, NQ, NKV, HALF, BLOCK_HQ, BLOCK_HKV, BLOCK_D, ".cg")


def _launch_decode(x, wqkv, heads, rope, cache, positions, slot_mapping):
    (n_q, n_kv), (cos, sin), (k_cache, v_cache) = heads, rope, cache
    M, K = x.shape
    N = wqkv.shape[0]
    half = N // (n_q + 2 * n_kv) // 2
    qkv = torch.empty((M, N), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
    _decode_qkv_rotary_kernel[grid](
        x, wqkv, qkv, positions, cos, sin, k_cache, v_cache, slot_mapping,
        arrival_counters(x.device, 1), M, N, K, triton.next_power_of_2(M), x.stride(0),
        wqkv.stride(0), qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], n_q, n_kv, half, DOT_PREC=dot_precision(x.dtype),
        BLOCK_HQ=triton.next_power_of_2(n_q), BLOCK_HKV=triton.next_power_of_2(n_kv),
        BLOCK_D=triton.next_power_of_2(half))
    return split_heads(qkv, n_q, n_kv)[0]


def qkv_rotary_triton(x, wqkv, heads, rope, cache, positions, slot_mapping):
    x, wqkv = (t if t.stride(-1) == 1 else t.contiguous() for t in (x, wqkv))
    for t in (*rope, *cache):
        assert t.stride(-1) == 1, "qkv_rotary needs unit stride in the last dimension"
    assert rope[0].stride() == rope[1].stride()
    if 0 < x.shape[0] <= DECODE_MAX_ROWS:
        return _launch_decode(x, wqkv, heads, rope, cache, positions, slot_mapping)
    q, k, v = split_heads(linear_triton(x, wqkv), *heads)
    rotary_cache_write_triton(q, k, v, positions, *rope, *cache, slot_mapping)
    return q


def qkv_rotary(x, wqkv, heads, rope, cache, positions, slot_mapping):
    """x [T, hidden]; wqkv [(n_q + 2 n_kv) * head_dim, hidden]; heads (n_q, n_kv); rope the
    (cos, sin) tables; cache (k_cache, v_cache). Writes rotate(k) and v at slot_mapping (negative
    slots: nothing) and returns rotate(q) [T, n_q, head_dim]."""
    fn = qkv_rotary_triton if use_triton(x) else qkv_rotary_ref
    return fn(x, wqkv, heads, rope, cache, positions, slot_mapping)
