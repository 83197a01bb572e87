"""Shared helpers for the kernel tests (run under TRITON_INTERPRET=1 on the CPU)."""
import pytest
import torch


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64; NaN never passes a `<` comparison."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


# fp32 is compared with fp32 arithmetic on both sides; fp16 outputs carry ~5e-4 rounding.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
