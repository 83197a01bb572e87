"""Rotary position embedding (HF rotate_half layout) fused with writing K and V into the paged
cache, plus the cos/sin tables for the default, linear and llama3 frequency schedules."""
import math

import torch

from .dispatch import use_triton


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


def _rotate(x, cos, sin):
    # x [T, heads, hd] -> fp32 rotated copy; cos/sin [T, hd/2]
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rotary_cache_write_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
    pos = positions.long()
    c, s = cos[pos], sin[pos]
    q.copy_(_rotate(q, c, s).to(q.dtype))
    k_rot = _rotate(k, c, s).to(k_cache.dtype)
    n_kv, hd = k_cache.shape[-2], k_cache.shape[-1]
    slots = slot_mapping.long()
    keep = slots >= 0  # negative slots mark padded rows (CUDA-graph batches): nothing is written
    k_cache.view(-1, n_kv, hd)[slots[keep]] = k_rot[keep]
    v_cache.view(-1, n_kv, hd)[slots[keep]] = v[keep].to(v_cache.dtype)


def rotary_cache_write_triton(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
    rotary_cache_write_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)


def rotary_cache_write(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping):
    """Rotate q in place; write rotate(k) and v into the paged caches at slot_mapping."""
    if use_triton(q):
        return rotary_cache_write_triton(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    return rotary_cache_write_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
