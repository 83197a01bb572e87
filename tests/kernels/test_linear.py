import pytest
import torch

from conftest import TOL, rel_err
from kernels.linear import linear, linear_ref, linear_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 3, 16, 17, 70])  # decode kernel up to 16 rows, tiled GEMM above
@pytest.mark.parametrize("N,K", [(48, 64), (100, 72)])  # off-tile N and K exercise the masks
def test_linear_triton_matches_ref(dtype, T, N, K):
    x = torch.randn(T, K, dtype=dtype)
    w = torch.randn(N, K, dtype=dtype) / K ** 0.5
    out = linear_triton(x, w)
    assert out.shape == (T, N) and out.dtype == dtype
    ref = linear_ref(x.double(), w.double())
    assert rel_err(out, ref) < TOL[dtype]


def test_linear_triton_strided_input():
    x = torch.randn(4, 96)[:, 16:80]  # row stride 96, not K
    w = torch.randn(40, 64)
    assert rel_err(linear_triton(x, w), x.double() @ w.double().T) < 1e-5


def test_linear_public_dispatch(monkeypatch):
    import importlib
    mod = importlib.import_module("kernels.linear")
    monkeypatch.setattr(mod, "linear_triton", lambda *a: pytest.fail("Triton on a CPU tensor"))
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    assert torch.equal(linear(x, w), x @ w.T)
