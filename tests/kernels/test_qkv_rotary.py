import pytest
import torch

from conftest import TOL, rel_err
from kernels import arrival
from kernels import qkv_rotary as qr
from kernels.linear import linear_triton
from kernels.qkv_rotary import qkv_rotary, qkv_rotary_ref, qkv_rotary_triton, split_heads
from kernels.rotary import rope_tables, rotary_cache_write_triton


def _case(T, n_q, n_kv, head_dim, dtype, hidden=40, num_blocks=8, block_size=4):
    x = torch.randn(T, hidden + 8, dtype=dtype)[:, 8:]   # strided rows
    wqkv = torch.randn((n_q + 2 * n_kv) * head_dim, hidden, dtype=dtype) / hidden ** 0.5
    rope = rope_tables(head_dim, 64, 10000.0)
    cache = tuple(torch.randn(num_blocks, block_size, n_kv, head_dim, dtype=dtype)
                  for _ in range(2))
    positions = torch.randint(0, 64, (T,))
    slots = torch.randperm(num_blocks * block_size)[:T]
    slots[T // 2] = -1   # a padding row: its k and v are not written
    return x, wqkv, (n_q, n_kv), rope, cache, positions, slots


def _run(fn, x, wqkv, heads, rope, cache, positions, slots):
    cache = tuple(c.clone() for c in cache)
    return fn(x, wqkv, heads, rope, cache, positions, slots), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 5, 16, 20])   # the fused decode kernel up to 16 rows
@pytest.mark.parametrize("n_q,n_kv,head_dim", [(4, 2, 16), (2, 2, 8), (6, 1, 64)])
def test_qkv_rotary_triton_matches_ref(dtype, T, n_q, n_kv, head_dim):
    case = _case(T, n_q, n_kv, head_dim, dtype)
    q, (k_cache, v_cache) = _run(qkv_rotary_triton, *case)
    x, wqkv, heads, rope, cache, positions, slots = case
    up = lambda t: t.double()
    q_ref, (k_ref, v_ref) = _run(qkv_rotary_ref, up(x), up(wqkv), heads, tuple(map(up, rope)),
                                 tuple(map(up, cache)), positions, slots)
    assert q.shape == (T, n_q, head_dim) and q.dtype == dtype
    assert rel_err(q, q_ref) < TOL[dtype]
    assert rel_err(k_cache, k_ref) < TOL[dtype] and rel_err(v_cache, v_ref) < TOL[dtype]
    untouched = torch.ones(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(k_cache.flatten(0, 1)[untouched], cache[0].flatten(0, 1)[untouched])
    assert torch.equal(v_cache.flatten(0, 1)[untouched], cache[1].flatten(0, 1)[untouched])


def test_fused_equals_gemv_then_rotary_kernel_and_resets_its_counter():
    x, wqkv, heads, rope, cache, positions, slots = _case(3, 4, 2, 16, torch.float32)
    q, (k_cache, v_cache) = _run(qkv_rotary_triton, x, wqkv, heads, rope, cache, positions, slots)
    assert all(not c.any() for c in arrival._arrival_counters[x.device])
    want_q, k, v = split_heads(linear_triton(x, wqkv), *heads)
    want_cache = tuple(c.clone() for c in cache)
    rotary_cache_write_triton(want_q, k, v, positions, *rope, *want_cache, slots)
    assert torch.equal(q, want_q)
    assert torch.equal(k_cache, want_cache[0]) and torch.equal(v_cache, want_cache[1])


def test_public_qkv_rotary_runs_the_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(qr, "qkv_rotary_triton", lambda *a: pytest.fail("Triton on CPU"))
    q, _ = _run(qkv_rotary, *_case(3, 2, 1, 16, torch.float64))
    assert q.shape == (3, 2, 16)
