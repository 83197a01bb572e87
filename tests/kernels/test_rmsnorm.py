import pytest
import torch

from conftest import TOL, rel_err
from kernels import linear as linear_mod
from kernels.linear import SplitPartials, linear_triton
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 3])
def test_rmsnorm_sums_split_k_partials_as_the_gemv_would(monkeypatch, dtype, T):
    """Given a split-K GEMV's unsummed partials, the same bits as the GEMV summing them itself
    and RMSNorm reading its output: the sum, the residual sum and the normed rows."""
    monkeypatch.setenv("LLAMA_TRITON_SPLITK", "1")
    monkeypatch.setattr(linear_mod, "decode_split_k",
                        lambda n, k, sms: linear_mod._round_split(4, k))
    x, w = torch.randn(T, 512, dtype=dtype), torch.randn(96, 512, dtype=dtype) / 20
    norm_w, res = (1 + 0.1 * torch.randn(96)).to(dtype), torch.randn(T, 96, dtype=dtype)
    partials = linear_triton(x, w, sum_later=True)
    assert isinstance(partials, SplitPartials) and partials.parts.shape[0] == 4
    got_out, got_s = rmsnorm(partials, norm_w, 1e-5, res)
    want_out, want_s = rmsnorm_triton(linear_triton(x, w), norm_w, 1e-5, res)
    assert got_out.dtype == dtype and got_s.dtype == dtype
    assert torch.equal(got_s, want_s) and torch.equal(got_out, want_out)
