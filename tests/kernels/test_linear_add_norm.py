import pytest
import torch

from conftest import TOL, rel_err
from kernels import arrival
from kernels import linear_add_norm as lan
from kernels.linear import linear_triton
from kernels.linear_add_norm import linear_add_norm, linear_add_norm_ref, linear_add_norm_triton
from kernels.rmsnorm import rmsnorm_triton


def _case(T, N, K, dtype):
    x = torch.randn(T, K + 8, dtype=dtype)[:, 8:]   # strided rows
    w = torch.randn(N, K, dtype=dtype) / K ** 0.5
    residual = torch.randn(T, N, dtype=dtype)
    norm_weight = torch.rand(N, dtype=dtype) + 0.5
    return x, w, residual, norm_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 5, 16, 30])   # the fused GEMV up to 16 rows, then GEMM + norm
@pytest.mark.parametrize("N,K", [(48, 64), (100, 72)])  # several programs; ragged N and K
def test_linear_add_norm_matches_ref(dtype, T, N, K):
    x, w, residual, norm_weight = _case(T, N, K, dtype)
    out, h = linear_add_norm_triton(x, w, residual, norm_weight, 1e-5)
    ref_out, ref_h = linear_add_norm_ref(x.double(), w.double(), residual.double(),
                                         norm_weight.double(), 1e-5)
    assert out.dtype == h.dtype == dtype and out.shape == h.shape == (T, N)
    assert rel_err(h, ref_h) < TOL[dtype] and rel_err(out, ref_out) < TOL[dtype]


@pytest.mark.parametrize("T", [1, 7])
def test_fused_equals_gemv_then_rmsnorm_kernel(T):
    # the same products, the same add, the same norm arithmetic: bit for bit in fp32
    x, w, residual, norm_weight = _case(T, 80, 96, torch.float32)
    out, h = linear_add_norm_triton(x, w, residual, norm_weight, 1e-6)
    want_out, want_h = rmsnorm_triton(linear_triton(x, w), norm_weight, 1e-6, residual)
    assert torch.equal(h, want_h) and torch.equal(out, want_out)


def test_counter_is_back_at_zero_and_runs_repeat_bit_for_bit():
    x, w, residual, norm_weight = _case(3, 100, 40, torch.float32)
    first = linear_add_norm_triton(x, w, residual, norm_weight, 1e-5)
    assert all(not c.any() for c in arrival._arrival_counters[x.device])
    second = linear_add_norm_triton(x, w, residual, norm_weight, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_public_op_runs_the_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(lan, "linear_add_norm_triton", lambda *a: pytest.fail("Triton on CPU"))
    x, w, residual, norm_weight = _case(2, 24, 40, torch.float64)
    out, h = linear_add_norm(x, w, residual, norm_weight, 1e-6)
    assert torch.allclose(h, x @ w.T + residual)
