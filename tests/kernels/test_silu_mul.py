import pytest
import torch

from conftest import TOL, rel_err
from kernels.silu_mul import silu_mul, silu_mul_ref, silu_mul_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,I", [(1, 64), (3, 200), (7, 130)])
def test_silu_mul_triton_matches_ref(dtype, T, I):
    x = 3 * torch.randn(T, 2 * I, dtype=dtype)
    out = silu_mul_triton(x)
    assert out.shape == (T, I) and out.dtype == dtype
    assert rel_err(out, silu_mul_ref(x)) < TOL[dtype]


def test_silu_mul_ref_definition():
    x = torch.randn(2, 8, dtype=torch.float64)
    assert torch.allclose(silu_mul_ref(x), x[:, :4] * torch.sigmoid(x[:, :4]) * x[:, 4:])


def test_silu_mul_public_on_cpu():
    x = torch.randn(2, 8)
    assert torch.equal(silu_mul(x), silu_mul_ref(x))
