import pytest
import torch

from conftest import TOL, rel_err
from kernels.rotary import rope_tables, rotary_cache_write, rotary_cache_write_ref, rotary_cache_write_triton

SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_tables_match_transformers(scaling, head_dim):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, rope_theta=500000.0,
                      rope_scaling=scaling, max_position_embeddings=512)
    hf = LlamaRotaryEmbedding(cfg)
    positions = torch.arange(300)[None]
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope_tables(head_dim, 300, 500000.0, scaling)
    assert cos.dtype == torch.float32 and cos.shape == (300, head_dim // 2)
    # HF repeats the half table: emb = cat(freqs, freqs)
    torch.testing.assert_close(torch.cat([cos, cos], -1), hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([sin, sin], -1), hf_sin[0], rtol=0, atol=1e-6)


def test_rope_tables_reject_unknown_scaling():
    with pytest.raises(ValueError, match="yarn"):
        rope_tables(64, 8, 10000.0, {"rope_type": "yarn", "factor": 2.0})


def _inputs(T, nq, nkv, hd, dtype, num_blocks=6, block_size=4):
    # q, k, v as strided views of one fused qkv buffer, as the model produces them
    qkv = torch.randn(T, (nq + 2 * nkv) * hd, dtype=dtype)
    q = qkv[:, :nq * hd].view(T, nq, hd)
    k = qkv[:, nq * hd:(nq + nkv) * hd].view(T, nkv, hd)
    v = qkv[:, (nq + nkv) * hd:].view(T, nkv, hd)
    positions = torch.randint(0, 50, (T,), dtype=torch.int32)
    slots = torch.randperm(num_blocks * block_size)[:T].to(torch.int32)
    k_cache = torch.randn(num_blocks, block_size, nkv, hd, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_size, nkv, hd, dtype=dtype)
    return qkv, q, k, v, positions, slots, k_cache, v_cache


def _run(fn, qkv, q, k, v, positions, cos, sin, k_cache, v_cache, slots):
    qkv, k_cache, v_cache = qkv.clone(), k_cache.clone(), v_cache.clone()
    nq, hd = q.shape[1], q.shape[2]
    nkv = k.shape[1]
    q = qkv[:, :nq * hd].view(-1, nq, hd)
    k = qkv[:, nq * hd:(nq + nkv) * hd].view(-1, nkv, hd)
    v = qkv[:, (nq + nkv) * hd:].view(-1, nkv, hd)
    fn(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    return qkv, k_cache, v_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,nq,nkv,hd", [(1, 4, 4, 64), (5, 8, 2, 64), (7, 8, 1, 128), (3, 6, 3, 128)])
def test_rotary_cache_write_triton_matches_ref(dtype, T, nq, nkv, hd):
    qkv, q, k, v, positions, slots, k_cache, v_cache = _inputs(T, nq, nkv, hd, dtype)
    cos, sin = rope_tables(hd, 64, 10000.0, None)
    args = (qkv, q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    got = _run(rotary_cache_write_triton, *args)
    want = _run(rotary_cache_write_ref, *args)
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL[dtype]
    # slots nobody wrote keep their old contents; v is copied bit for bit
    assert torch.equal(got[2].flatten(0, 1)[slots.long()], v.to(dtype))
    untouched = torch.ones(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool)
    untouched[slots.long()] = False
    assert torch.equal(got[1].flatten(0, 1)[untouched], k_cache.flatten(0, 1)[untouched])


def test_rotary_ref_is_hf_rotate_half():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    qkv, q, k, v, positions, slots, k_cache, v_cache = _inputs(4, 4, 2, 64, torch.float32)
    cos, sin = rope_tables(64, 64, 10000.0, None)
    c = torch.cat([cos, cos], -1)[positions.long()][None]  # [1, T, hd]
    s = torch.cat([sin, sin], -1)[positions.long()][None]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], c, s)
    got_qkv, got_k, _ = _run(rotary_cache_write_ref, qkv, q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    torch.testing.assert_close(got_qkv[:, :256].view(4, 4, 64), hf_q[0].transpose(0, 1))
    torch.testing.assert_close(got_k.flatten(0, 1)[slots.long()], hf_k[0].transpose(0, 1))


@pytest.mark.parametrize("fn", [rotary_cache_write_ref, rotary_cache_write_triton])
def test_negative_slots_are_skipped(fn):
    qkv, q, k, v, positions, slots, k_cache, v_cache = _inputs(3, 4, 2, 64, torch.float32)
    slots[1] = -1
    cos, sin = rope_tables(64, 64, 10000.0, None)
    _, kc, vc = _run(fn, qkv, q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    keep = torch.ones(kc.shape[0] * kc.shape[1], dtype=torch.bool)
    keep[slots[[0, 2]].long()] = False
    assert torch.equal(kc.flatten(0, 1)[keep], k_cache.flatten(0, 1)[keep])
    assert torch.equal(vc.flatten(0, 1)[keep], v_cache.flatten(0, 1)[keep])


def test_rotary_public_on_cpu():
    qkv, q, k, v, positions, slots, k_cache, v_cache = _inputs(3, 4, 2, 64, torch.float32)
    cos, sin = rope_tables(64, 64, 10000.0, None)
    args = (qkv, q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    for g, w in zip(_run(rotary_cache_write, *args), _run(rotary_cache_write_ref, *args)):
        assert torch.equal(g, w)
