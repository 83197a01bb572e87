"""Rotary position embedding (HF rotate_half layout) fused with writing K and V into the paged
cache, plus the cos/sin tables for the default, linear and llama3 frequency schedules."""
import math

import torch
import triton
import triton.language as tl

from .dispatch import use_triton
from .pdl import pdl_args, pdl_release, pdl_wait


def _inv_freq(head_dim, theta, scaling, device):
    # Same arithmetic as transformers' modeling_rope_utils, so tables match HF bit for bit.
    exps = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exps)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq, s):
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(head_dim, max_positions, theta, scaling=None, device=None):
    """cos, sin: float32 [max_positions, head_dim // 2]; row p holds angles p * inv_freq."""
    inv_freq = _inv_freq(head_dim, theta, scaling, device)
    pos = torch.arange(max_positions, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def _rotate(x, cos_full, sin_signed):
    # x [T, heads, hd] -> fp32 rotated copy: (x1 c - x2 s, x2 c + x1 s) as x * [c, c] +
    # roll(x) * [-s, s], the same products and sums in fewer ops (this runs per layer per token
    # on the CPU, where each op's fixed cost is the price)
    xf = x.float()
    return xf * cos_full + xf.roll(x.shape[-1] // 2, -1) * sin_signed


def rotary_cache_write_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
    pos = positions.long()
    c, s = cos[pos], sin[pos]
    cos_full, sin_signed = torch.cat((c, c), -1)[:, None], torch.cat((-s, s), -1)[:, None]
    q.copy_(_rotate(q, cos_full, sin_signed))
    k_rot = _rotate(k, cos_full, sin_signed).to(k_cache.dtype)
    n_kv, hd = k_cache.shape[-2], k_cache.shape[-1]
    slots = slot_mapping.long()
    v = v.to(v_cache.dtype)
    if bool((slots < 0).any()):  # negative slots mark padded rows: nothing is written for them
        keep = slots >= 0
        slots, k_rot, v = slots[keep], k_rot[keep], v[keep]
    # index_copy_ rather than masked assignment: on the CPU this op runs once per layer per token
    k_cache.view(-1, n_kv, hd).index_copy_(0, slots, k_rot)
    v_cache.view(-1, n_kv, hd).index_copy_(0, slots, v)


@triton.jit
def rotate_pair(x1, x2, c, s):
    """rotate_half rotary of the pairs (x1, x2) = (x[j], x[j + half]), in fp32."""
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _load_halves(ptr, rows, n_rows, row_stride, d, HALF):
    """One token's [rows, 2 * HALF] heads as two fp32 halves: (x[:, :HALF], x[:, HALF:])."""
    mask = (rows[:, None] < n_rows) & (d[None, :] < HALF)
    p1 = ptr + rows[:, None] * row_stride + d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _store_halves(ptr, x1, x2, rows, n_rows, row_stride, d, HALF):
    """The inverse of _load_halves, cast to ptr's dtype."""
    mask = (rows[:, None] < n_rows) & (d[None, :] < HALF)
    p1 = ptr + rows[:, None] * row_stride + d[None, :]
    tl.store(p1, x1.to(ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, x2.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
                         sqt, sqh, skt, skh, svt, svh, s_cos, kcb, kcr, kch, vcb, vcr, vch,
                         block_size, NQ, NKV, HALF,
                         BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_D: tl.constexpr,
                         PDL: tl.constexpr):
    # one program per token: q, k and v of a token are touched exactly once, in one launch.
    # Every load comes before every store so that the next kernel may launch in between.
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    hq, hk = tl.arange(0, BLOCK_HQ), tl.arange(0, BLOCK_HKV)
    pdl_wait(PDL)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    c = tl.load(cos_ptr + pos * s_cos + d, mask=d < HALF, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * s_cos + d, mask=d < HALF, other=0.0)[None, :]
    q1, q2 = _load_halves(q_ptr + t * sqt, hq, NQ, sqh, d, HALF)
    k1, k2 = _load_halves(k_ptr + t * skt, hk, NKV, skh, d, HALF)
    v1, v2 = _load_halves(v_ptr + t * svt, hk, NKV, svh, d, HALF)
    pdl_release(PDL)
    q1, q2 = rotate_pair(q1, q2, c, s)
    _store_halves(q_ptr + t * sqt, q1, q2, hq, NQ, sqh, d, HALF)
    if slot >= 0:  # negative slots are padding rows: nothing to cache
        blk, row = slot // block_size, slot % block_size
        k1, k2 = rotate_pair(k1, k2, c, s)
        _store_halves(kc_ptr + blk * kcb + row * kcr, k1, k2, hk, NKV, kch, d, HALF)
        _store_halves(vc_ptr + blk * vcb + row * vcr, v1, v2, hk, NKV, vch, d, HALF)


def rotary_cache_write_triton(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
    T, NQ, hd = q.shape
    NKV = k.shape[1]
    for t in (q, k, v, k_cache, v_cache, cos, sin):
        assert t.stride(-1) == 1, "rotary_cache_write needs unit stride in the last dimension"
    assert cos.stride() == sin.stride()
    if T == 0:
        return
    _rotary_cache_kernel[(T,)](
        q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_cache.shape[1], NQ, NKV, hd // 2,
        BLOCK_HQ=triton.next_power_of_2(NQ), BLOCK_HKV=triton.next_power_of_2(NKV),
        BLOCK_D=triton.next_power_of_2(hd // 2), num_warps=4, **pdl_args(q.device))


def rotary_cache_write(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
    """Rotate q in place; write rotate(k) and v into the paged caches at slot_mapping."""
    if use_triton(q):
        return rotary_cache_write_triton(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    return rotary_cache_write_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
