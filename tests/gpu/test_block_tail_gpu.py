"""The persistent block-tail kernel (kernels/block_tail.py) on a real GPU: one launch whose
programs pass grid barriers (kernels/grid_barrier.py) between its phases, against the separate
kernels' arithmetic in float64, repeated, and replayed in a CUDA graph with PDL."""
import pytest
import torch

from kernels import grid_barrier, pdl
from kernels.block_tail import block_tail, block_tail_ops, block_tail_triton

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEV = "cuda"
TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-5}
# (hidden, q_size, intermediate, qkv rows): the 1B and 8B shapes, and a ragged small one
SHAPES = [(2048, 2048, 8192, 3072), (4096, 4096, 14336, 6144), (200, 136, 328, 264)]


def _operands(M, H, KQ, I, NQKV, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device=DEV, generator=g) * scale).to(dtype)
    return dict(attn=rnd(M, KQ), residual=rnd(M, H), wo=rnd(H, KQ, scale=KQ ** -0.5),
                ffn_norm=rnd(H, scale=0.1) + 1, w13=rnd(2 * I, H, scale=H ** -0.5),
                w2=rnd(H, I, scale=I ** -0.5), next_norm=rnd(H, scale=0.1) + 1,
                next_wqkv=rnd(NQKV, H, scale=H ** -0.5))


def _run(fn, ops, nxt, cast=None):
    cast = cast or (lambda t: t)
    args = [cast(ops[k]) for k in ("attn", "residual", "wo", "ffn_norm", "w13", "w2")]
    extra = (cast(ops["next_norm"]), cast(ops["next_wqkv"])) if nxt else (None, None)
    return fn(*args, 1e-5, *extra)


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.fixture(autouse=True)
def _poison_allocator():
    for n in (1 << 10, 1 << 16, 1 << 20, 1 << 24, 1 << 27):  # unwritten outputs read as NaN
        torch.empty(n, device=DEV).fill_(float("nan"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nxt", [False, True])
def test_block_tail_matches_the_separate_ops(monkeypatch, dtype, M, shape, nxt):
    if dtype == torch.float32 and shape[0] == 4096:
        pytest.skip("fp32 at the 8B shape: covered by the 1B and small shapes, 2x the memory")
    ops = _operands(M, *shape, dtype)
    got = _run(block_tail_triton, ops, nxt)
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")  # the ops' references, in float64
    want = _run(block_tail_ops, ops, nxt, cast=lambda t: t.double())
    for out, ref in zip(got, want):
        assert out.dtype == dtype and out.shape == ref.shape
        assert _rel(out, ref) < TOL[dtype]


def test_block_tail_repeats_bit_for_bit_and_leaves_the_barrier_at_zero():
    ops = _operands(3, *SHAPES[1], torch.bfloat16)
    first = _run(block_tail_triton, ops, True)
    for _ in range(20):
        again = _run(block_tail_triton, ops, True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    torch.cuda.synchronize()
    assert grid_barrier.barrier_state(torch.device(DEV))[0].item() == 0


def test_block_tail_chain_in_a_cuda_graph_with_pdl_equals_eager():
    """Four block tails in a row (each reading what the one before wrote), captured with PDL,
    replayed on new inputs: the eager results bit for bit."""
    ops = _operands(1, *SHAPES[0], torch.bfloat16)

    def chain():
        qkv, res = ops["attn"], ops["residual"]
        for _ in range(4):
            qkv, res = block_tail(qkv[:, :ops["attn"].shape[1]], res, ops["wo"], ops["ffn_norm"],
                                  ops["w13"], ops["w2"], 1e-5, ops["next_norm"],
                                  ops["next_wqkv"])
        return qkv, res

    inputs = [torch.randn_like(ops["attn"]) for _ in range(3)]
    want = []
    for value in inputs:
        ops["attn"].copy_(value)
        want.append([t.clone() for t in chain()])
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = chain()
    assert pdl.pdl_args(torch.device(DEV))["PDL"] == pdl.pdl_enabled(torch.device(DEV))
    for value, expected in zip(inputs, want):
        ops["attn"].copy_(value)
        g.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(out, expected))


def test_switch_off_runs_the_separate_kernels(monkeypatch):
    ops = _operands(2, *SHAPES[2], torch.float32)
    monkeypatch.setenv("LLAMA_TRITON_BLOCK_TAIL", "0")  # (the ops themselves run Triton)
    off = _run(block_tail, ops, True)
    assert all(torch.equal(a, b) for a, b in zip(off, _run(block_tail_ops, ops, True)))
    monkeypatch.setenv("LLAMA_TRITON_BLOCK_TAIL", "1")
    on = _run(block_tail, ops, True)
    assert all(torch.equal(a, b) for a, b in zip(on, _run(block_tail_triton, ops, True)))
    assert all(_rel(a, b.double()) < TOL[torch.float32] for a, b in zip(on, off))
