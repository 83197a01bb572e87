import pytest
import torch

from conftest import TOL, rel_err
from kernels import gate_up_silu as gus
from kernels.gate_up_silu import gate_up_silu, gate_up_silu_ref, gate_up_silu_triton
from kernels.linear import cpu_layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 3, 16, 17, 40])  # fused decode kernel up to 16 rows
@pytest.mark.parametrize("I,K", [(200, 96), (48, 72), (40, 100)])  # off-tile I and K: masks
def test_gate_up_silu_triton_matches_ref(dtype, T, I, K):
    x = torch.randn(T, K, dtype=dtype)
    w13 = torch.randn(2 * I, K, dtype=dtype) / K ** 0.5
    out = gate_up_silu_triton(x, w13)
    assert out.shape == (T, I) and out.dtype == dtype
    assert rel_err(out, gate_up_silu_ref(x.double(), w13.double())) < TOL[dtype]


def test_gate_up_silu_takes_the_gate_then_up_rows():
    # a gate row of zeros gives silu(0) * up = 0 for that column only; up and gate not swapped
    x, w13 = torch.randn(2, 32), torch.randn(64, 32)
    w13[5] = 0
    out = gate_up_silu_triton(x, w13)
    assert torch.equal(out[:, 5], torch.zeros(2))
    g, u = x.double() @ w13.double()[:32].T, x.double() @ w13.double()[32:].T
    assert rel_err(out, torch.nn.functional.silu(g) * u) < TOL[torch.float32]


def test_gate_up_silu_triton_strided_inputs_and_no_rows():
    x = torch.randn(3, 96)[:, 16:80]  # row stride 96, not K
    w13 = torch.randn(80, 64)
    assert rel_err(gate_up_silu_triton(x, w13), gate_up_silu_ref(x.double(), w13.double())) < 1e-5
    xt, wt = x.T.contiguous().T, w13.T.contiguous().T  # column-major: copied to rows first
    assert rel_err(gate_up_silu_triton(xt, wt), gate_up_silu_ref(x.double(), w13.double())) < 1e-5
    assert gate_up_silu_triton(torch.randn(0, 64), w13).shape == (0, 40)


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_gate_up_silu_public_on_cpu_layout(monkeypatch, parts):
    # CPU models store w13 as cpu_layout chunks; the public op runs the reference on them
    monkeypatch.setattr(gus, "gate_up_silu_triton", lambda *a: pytest.fail("Triton on CPU"))
    x, w13 = torch.randn(2, 40, dtype=torch.float64), torch.randn(24, 40, dtype=torch.float64)
    out = gate_up_silu(x, cpu_layout(w13, parts))
    assert torch.allclose(out, gate_up_silu_ref(x, w13), rtol=1e-12, atol=1e-12)


def test_decode_configs_fit_shared_memory():
    # two bf16 weight tiles a stage: every candidate stays well inside the H100's 227 KB
    assert all(gus.smem_bytes(n, k, s) <= 160 * 1024 for n, k, _, s in gus.DECODE_SHAPES)
