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


@pytest.fixture
def shuffle_programs(monkeypatch):
    """The interpreter runs programs one at a time in grid order, so a group's last program is
    always its highest and groups never interleave. On a GPU any program may finish last: the
    returned switch makes every later launch run its programs in a fresh random order (for the
    kernels whose last program of a group combines the group's results, kernels/arrival.py)."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    builder = getattr(interpreter, "interpreter_builder", None)
    if not (hasattr(builder, "set_grid_idx") and hasattr(builder, "set_grid_dim")):
        pytest.skip("this triton's interpreter cannot be made to reorder programs")
    set_grid_idx = type(builder).set_grid_idx
    order = []
    gen = torch.Generator().manual_seed(1)

    def shuffled(x, y, z):
        nx, ny, nz = builder.grid_dim
        if (x, y, z) == (0, 0, 0):  # a new launch
            order[:] = torch.randperm(nx * ny * nz, generator=gen).tolist()
        i = order[(x * ny + y) * nz + z]
        set_grid_idx(builder, i // (ny * nz), i // nz % ny, i % nz)

    return lambda: monkeypatch.setattr(builder, "set_grid_idx", shuffled)
