import pytest
import torch

from conftest import TOL, rel_err
from kernels.rmsnorm import rmsnorm, rmsnorm_ref, rmsnorm_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,H", [(1, 64), (5, 96), (3, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_triton_matches_ref(dtype, T, H, with_residual):
    x = torch.randn(T, H, dtype=dtype)
    w = (1 + 0.1 * torch.randn(H)).to(dtype)
    res = torch.randn(T, H, dtype=dtype) if with_residual else None
    out, s = rmsnorm_triton(x, w, 1e-5, res)
    ref_out, ref_s = rmsnorm_ref(x, w, 1e-5, res)
    assert out.dtype == dtype and out.shape == (T, H)
    assert rel_err(out, ref_out) < TOL[dtype]
    assert torch.equal(s, ref_s)  # the residual sum is rounded exactly as torch rounds it


def test_rmsnorm_ref_matches_hf_llama_rmsnorm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    x = torch.randn(4, 32, dtype=torch.float16)
    hf = LlamaRMSNorm(32, eps=1e-6).half()
    hf.weight.data = torch.randn(32).half()
    out, s = rmsnorm_ref(x, hf.weight.data, 1e-6)
    assert torch.equal(out, hf(x)) and s is x


def test_rmsnorm_public_uses_ref_on_cpu(monkeypatch):
    import importlib
    mod = importlib.import_module("kernels.rmsnorm")
    monkeypatch.setattr(mod, "rmsnorm_triton", lambda *a: pytest.fail("Triton on a CPU tensor"))
    x, w = torch.randn(2, 16), torch.randn(16)
    out, _ = rmsnorm(x, w, 1e-5)
    assert torch.equal(out, rmsnorm_ref(x, w, 1e-5)[0])
