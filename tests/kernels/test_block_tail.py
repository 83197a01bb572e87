"""The block-tail kernel's phases under the interpreter (one launch each: the interpreter cannot
pass the grid barrier that joins them on a GPU; tests/gpu covers that), against the separate
ops run in float64."""
import pytest
import torch

from conftest import TOL, rel_err
from kernels import block_tail as bt
from kernels.block_tail import block_tail, block_tail_ops, block_tail_triton


def _operands(M, H, KQ, I, NQKV, dtype):
    rnd = lambda *s: (torch.randn(*s) / s[-1] ** 0.5).to(dtype)
    return dict(attn=torch.randn(M, KQ).to(dtype), residual=torch.randn(M, H).to(dtype),
                wo=rnd(H, KQ), ffn_norm=(1 + 0.1 * torch.randn(H)).to(dtype), w13=rnd(2 * I, H),
                w2=rnd(H, I), next_norm=(1 + 0.1 * torch.randn(H)).to(dtype),
                next_wqkv=rnd(NQKV, H))


def _run(fn, ops, nxt, cast=lambda t: t):
    args = [cast(ops[k]) for k in ("attn", "residual", "wo", "ffn_norm", "w13", "w2")]
    extra = (cast(ops["next_norm"]), cast(ops["next_wqkv"])) if nxt else (None, None)
    return fn(*args, 1e-5, *extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("shape", [(72, 64, 100, 120), (48, 80, 40, 24)])  # ragged strips
@pytest.mark.parametrize("nxt", [False, True])
def test_block_tail_phases_match_the_separate_ops(dtype, M, shape, nxt):
    ops = _operands(M, *shape, dtype)
    got = _run(block_tail_triton, ops, nxt)
    want = _run(block_tail_ops, ops, nxt, cast=lambda t: t.double())
    assert len(got) == 2
    for out, ref in zip(got, want):
        assert out.dtype == dtype and out.shape == ref.shape
        assert rel_err(out, ref) < TOL[dtype]


def test_block_tail_returns_qkv_and_h2_or_output_and_h1():
    # with a next block: (its qkv, h1 + d); without: (d, h1), for the next segment or the norm
    ops = _operands(2, 40, 32, 56, 48, torch.float64)
    d, h1 = _run(block_tail_ops, ops, False)
    qkv, h2 = _run(block_tail_ops, ops, True)
    assert torch.allclose(h2, h1 + d)
    x = torch.nn.functional.rms_norm(h2, (40,), ops["next_norm"], 1e-5)
    assert torch.allclose(qkv, x @ ops["next_wqkv"].T)
    got_d, got_h1 = _run(block_tail_triton, {k: v.float() for k, v in ops.items()}, False)
    assert rel_err(got_d, d) < 1e-5 and rel_err(got_h1, h1) < 1e-5


def test_each_program_owns_an_equal_strip():
    # the interpreter's 4 programs: 46 rows as 11, 11, 12, 12 (one row apart at most), and a
    # strip width that covers the widest
    assert [(p * 46 // 4, (p + 1) * 46 // 4) for p in range(4)] == [(0, 11), (11, 23), (23, 34),
                                                                     (34, 46)]
    assert bt._tiles(46, 4, 2)[0] == 16 and bt._tiles(4096, 132, 2)[0] == 32


def test_off_the_gpu_block_tail_is_the_separate_ops():
    ops = _operands(2, 40, 32, 56, 48, torch.float32)
    for nxt in (False, True):
        got, want = _run(block_tail, ops, nxt), _run(block_tail_ops, ops, nxt)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
