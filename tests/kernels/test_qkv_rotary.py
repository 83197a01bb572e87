import pytest
import torch

from conftest import TOL, rel_err
from kernels import qkv_rotary as qr
from kernels.qkv_rotary import qkv_rotary, qkv_rotary_ref, qkv_rotary_triton
from kernels.rotary import rope_tables


def _case(T, n_q, n_kv, head_dim, dtype, hidden=40, num_blocks=8, block_size=4):
    x = torch.randn(T, hidden + 8, dtype=dtype)[:, 8:]   # strided rows
    wqkv = torch.randn((n_q + 2 * n_kv) * head_dim, hidden, dtype=dtype) / hidden ** 0.5
    norm = (torch.rand(hidden, dtype=dtype) + 0.5, 1e-5)
    rope = rope_tables(head_dim, 64, 10000.0)
    cache = tuple(torch.randn(num_blocks, block_size, n_kv, head_dim, dtype=dtype)
                  for _ in range(2))
    positions = torch.randint(0, 64, (T,))
    slots = torch.randperm(num_blocks * block_size)[:T]
    slots[T // 2] = -1   # a padding row: its k and v are not written
    return x, wqkv, norm, (n_q, n_kv), rope, cache, positions, slots


def _run(fn, x, wqkv, norm, heads, rope, cache, positions, slots):
    cache = tuple(c.clone() for c in cache)
    q = fn(x, wqkv, norm, heads, rope, cache, positions, slots)
    return q, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 5, 16, 20])   # the fused decode kernel up to 16 rows
@pytest.mark.parametrize("n_q,n_kv,head_dim", [(4, 2, 16), (2, 2, 8), (6, 1, 64)])
@pytest.mark.parametrize("normed", [True, False])
def test_qkv_rotary_triton_matches_ref(dtype, T, n_q, n_kv, head_dim, normed):
    x, wqkv, norm, heads, rope, cache, positions, slots = _case(T, n_q, n_kv, head_dim, dtype)
    norm = norm if normed else None
    q, (k_cache, v_cache) = _run(qkv_rotary_triton, x, wqkv, norm, heads, rope, cache,
                                 positions, slots)
    up = lambda t: t.double()
    ref_norm = (up(norm[0]), norm[1]) if normed else None
    q_ref, (k_ref, v_ref) = _run(qkv_rotary_ref, up(x), up(wqkv), ref_norm, heads,
                                 tuple(map(up, rope)), tuple(map(up, cache)), positions, slots)
    assert q.shape == (T, n_q, head_dim) and q.dtype == dtype
    assert rel_err(q, q_ref) < TOL[dtype]
    assert rel_err(k_cache, k_ref) < TOL[dtype] and rel_err(v_cache, v_ref) < TOL[dtype]
    untouched = torch.ones(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(k_cache.flatten(0, 1)[untouched], cache[0].flatten(0, 1)[untouched])
    assert torch.equal(v_cache.flatten(0, 1)[untouched], cache[1].flatten(0, 1)[untouched])


def test_qkv_rotary_rotates_q_and_k_but_not_v():
    # at position 0 rotary is the identity; at position 5 only q and k change
    x, wqkv, norm, heads, rope, cache, _, _ = _case(2, 2, 1, 16, torch.float32)
    slots = torch.tensor([0, 1])
    q0, (k0, v0) = _run(qkv_rotary_triton, x, wqkv, norm, heads, rope, cache,
                        torch.tensor([0, 0]), slots)
    q5, (k5, v5) = _run(qkv_rotary_triton, x, wqkv, norm, heads, rope, cache,
                        torch.tensor([5, 5]), slots)
    assert not torch.allclose(q0, q5) and not torch.allclose(k0[0, :2], k5[0, :2])
    assert torch.equal(v0[0, :2], v5[0, :2])


def test_public_qkv_rotary_runs_the_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(qr, "qkv_rotary_triton", lambda *a: pytest.fail("Triton on CPU"))
    args = _case(3, 2, 1, 16, torch.float64)
    q, _ = _run(qkv_rotary, *args)
    assert q.shape == (3, 2, 16)
