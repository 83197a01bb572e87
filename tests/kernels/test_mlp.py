"""The fused decode MLP under the interpreter (its sum a second launch: the interpreter cannot
pass the grid barrier that joins the two on a GPU; tests/gpu covers that), against the
two-kernel MLP's arithmetic in float64."""
import pytest
import torch

from conftest import TOL, rel_err
from kernels import mlp as mlp_module
from kernels.mlp import mlp, mlp_decode_triton, mlp_ops, slice_width


def _operands(M, H, I, dtype):
    x = torch.randn(M, H).to(dtype)
    w13 = (torch.randn(2 * I, H) / H ** 0.5).to(dtype)
    w2 = (torch.randn(H, I) / I ** 0.5).to(dtype)
    return x, w13, w2


def _ref(x, w13, w2):
    return mlp_ops(x.double(), w13.double(), w2.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("H,I", [(64, 128), (72, 100), (40, 24)])  # ragged slices and columns
def test_fused_mlp_matches_the_two_kernels(dtype, M, H, I):
    x, w13, w2 = _operands(M, H, I, dtype)
    out = mlp_decode_triton(x, w13, w2)
    assert out.shape == (M, H) and out.dtype == dtype
    assert rel_err(out, _ref(x, w13, w2)) < TOL[dtype]


@pytest.mark.parametrize("sms", [3, 8])
def test_every_slice_and_share_is_counted(monkeypatch, sms):
    # more programs than a power of two (3 slices, masked in the sum) and more than the
    # interpreter's default 4, each slice 16 wide
    monkeypatch.setattr(mlp_module, "sm_count", lambda device: sms)
    x, w13, w2 = _operands(2, 48, 16 * sms - 5, torch.float32)
    assert slice_width(16 * sms - 5, sms) == 16
    assert rel_err(mlp_decode_triton(x, w13, w2), _ref(x, w13, w2)) < TOL[torch.float32]


def test_the_sum_does_not_depend_on_which_program_runs_first(shuffle_programs):
    x, w13, w2 = _operands(3, 72, 100, torch.float32)
    first = mlp_decode_triton(x, w13, w2)
    shuffle_programs()
    assert torch.equal(mlp_decode_triton(x, w13, w2), first)


def test_one_program_per_sm_at_most():
    assert slice_width(14336, 132) == 128 and -(-14336 // 128) == 112  # the 8B shape
    assert slice_width(8192, 132) == 64 and 8192 // 64 == 128  # the 1B shape
    assert slice_width(100, 132) == 16  # tl.dot's smallest tile


def test_strided_rows_are_copied_first():
    x, w13, w2 = _operands(2, 64, 48, torch.float32)
    wide = torch.randn(2, 96)
    wide[:, 16:80] = x
    got = mlp_decode_triton(wide[:, 16:80], w13.T.contiguous().T, w2.T.contiguous().T)
    assert rel_err(got, _ref(x, w13, w2)) < TOL[torch.float32]


def test_dispatch_takes_the_fused_kernel_only_when_switched_on_and_decoding(monkeypatch):
    monkeypatch.setattr(mlp_module, "use_triton", lambda t: True)
    calls = []
    monkeypatch.setattr(mlp_module, "mlp_decode_triton", lambda *a: calls.append(a) or a[0])
    x, w13, w2 = _operands(3, 64, 48, torch.float32)
    monkeypatch.setenv("LLAMA_TRITON_FUSED_MLP", "1")
    assert mlp(x, w13, w2) is x and len(calls) == 1
    long_x = torch.randn(17, 64)  # prefill-sized: the two kernels
    assert rel_err(mlp(long_x, w13, w2), _ref(long_x, w13, w2)) < TOL[torch.float32]
    monkeypatch.setenv("LLAMA_TRITON_FUSED_MLP", "0")
    assert rel_err(mlp(x, w13, w2), _ref(x, w13, w2)) < TOL[torch.float32] and len(calls) == 1


def test_a_mistyped_switch_says_which_values_it_takes(monkeypatch):
    monkeypatch.setattr(mlp_module, "use_triton", lambda t: True)
    monkeypatch.setenv("LLAMA_TRITON_FUSED_MLP", "yes")
    with pytest.raises(ValueError, match="LLAMA_TRITON_FUSED_MLP='yes' is not one of '0', '1'"):
        mlp(*_operands(1, 64, 48, torch.float32))
