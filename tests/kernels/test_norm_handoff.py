"""The RMSNorm handoff between decode GEMVs (kernels/norm_handoff.py), under the interpreter:
the producer's h, h times the weight and slot sums, and the consumers' 1/rms scaling, against
PyTorch's RMSNorm in float64."""
import pytest
import torch

from conftest import TOL, rel_err
from kernels import linear as linear_mod
from kernels.gate_up_silu import gate_up_silu, gate_up_silu_triton
from kernels.linear import handoff_applies, linear, linear_handoff, linear_triton
from kernels.norm_handoff import SLOT, handoff_ref, new_handoff, rstd_ref

EPS = 1e-5


def _produce(M, H, K, dtype):
    x = torch.randn(M, K).to(dtype)
    w = (torch.randn(H, K) / K ** 0.5).to(dtype)
    residual, norm_w = torch.randn(M, H).to(dtype), (1 + 0.1 * torch.randn(H)).to(dtype)
    made = new_handoff(M, H, dtype, "cpu", EPS)
    h = linear_triton(x, w, handoff=(residual, norm_w, made))
    want = x.double() @ w.double().T + residual.double()
    return h, made, want, norm_w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("H", [72, 48])  # 72: a last slot of 8 columns
@pytest.mark.parametrize("split_k", ["0", "1"])  # the unsplit kernel's epilogue, and split-K's
def test_producer_leaves_h_scaled_h_and_slot_sums(monkeypatch, dtype, M, H, split_k):
    monkeypatch.setenv("LLAMA_TRITON_SPLITK", split_k)
    h, made, want, norm_w = _produce(M, H, 100, dtype)
    ref = handoff_ref(want, norm_w.double(), EPS)
    assert h.dtype == made.scaled.dtype == dtype and made.square_sums.shape == (-(-H // SLOT), M)
    assert rel_err(h, want) < TOL[dtype]
    assert rel_err(made.scaled, ref.scaled) < TOL[dtype]
    assert rel_err(made.square_sums, ref.square_sums) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 5])
@pytest.mark.parametrize("split_k", ["0", "1"])
def test_consumers_equal_rmsnorm_then_the_gemv(monkeypatch, dtype, M, split_k):
    monkeypatch.setenv("LLAMA_TRITON_SPLITK", split_k)
    h, made, want, norm_w = _produce(M, 72, 64, dtype)
    normed = torch.nn.functional.rms_norm(want, (72,), norm_w.double(), EPS)
    w = (torch.randn(40, 72) / 72 ** 0.5).to(dtype)
    assert rel_err(linear_triton(made.scaled, w, rms=made), normed @ w.double().T) < TOL[dtype]
    w13 = (torch.randn(96, 72) / 72 ** 0.5).to(dtype)
    gate_up = normed @ w13.double().T
    want_y = torch.nn.functional.silu(gate_up[:, :48]) * gate_up[:, 48:]
    assert rel_err(gate_up_silu_triton(made.scaled, w13, rms=made), want_y) < TOL[dtype]


def test_reference_handoff_is_rmsnorm():
    h, norm_w = torch.randn(3, 40, dtype=torch.float64), torch.rand(40, dtype=torch.float64)
    made = handoff_ref(h, norm_w, EPS)
    assert made.square_sums.shape == (3, 3)  # 40 columns: slots of 16, 16 and 8
    normed = torch.nn.functional.rms_norm(h, (40,), norm_w, EPS)
    assert torch.allclose(made.scaled * rstd_ref(made), normed)


def test_off_the_gpu_the_ops_run_their_references():
    x, w, res = torch.randn(2, 24), torch.randn(40, 24), torch.randn(2, 40)
    norm_w, w13 = torch.rand(40), torch.randn(64, 40)
    h, made = linear_handoff(x, w, res, norm_w, EPS)
    assert torch.allclose(h, x @ w.T + res, atol=1e-5)
    normed = torch.nn.functional.rms_norm(h, (40,), norm_w, EPS)
    assert torch.allclose(linear(made.scaled, w13, rms=made), normed @ w13.T, atol=1e-4)
    gate, up = (normed @ w13.T).split(32, dim=1)
    assert torch.allclose(gate_up_silu(made.scaled, w13, rms=made),
                          torch.nn.functional.silu(gate) * up, atol=1e-4)


def test_handoff_applies_to_triton_decode_outside_fp16_when_switched_on(monkeypatch):
    monkeypatch.setattr(linear_mod, "use_triton", lambda t: True)
    x = torch.randn(4, 8)
    monkeypatch.delenv("LLAMA_TRITON_NORM_HANDOFF", raising=False)
    assert not handoff_applies(x)  # off by default
    monkeypatch.setenv("LLAMA_TRITON_NORM_HANDOFF", "1")
    assert handoff_applies(x) and handoff_applies(x.bfloat16())
    assert not handoff_applies(x.half()) and not handoff_applies(torch.randn(17, 8))
    monkeypatch.setattr(linear_mod, "use_triton", lambda t: False)
    assert not handoff_applies(x)


def test_prefill_rows_refuse_the_handoff():
    x, w = torch.randn(17, 32), torch.randn(16, 32)
    made = new_handoff(17, 32, torch.float32, "cpu", EPS)
    with pytest.raises(AssertionError, match="decode"):
        linear_triton(x, w, rms=made)
    with pytest.raises(AssertionError, match="decode"):
        gate_up_silu_triton(x, torch.randn(64, 32), rms=made)
