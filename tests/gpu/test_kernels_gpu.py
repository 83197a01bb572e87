"""Every Triton kernel against its reference on a real GPU, in bf16 and fp16, at model shapes.

Errors are ||out - ref|| / ||ref|| against the reference run in float64 on upcast inputs; bf16
outputs land between 1e-3 and 1e-2, fp16 several times lower. Before each test the allocator is
filled with NaN so that an output element a kernel never wrote fails the comparison."""

import pytest
import torch

from kernels.argmax import argmax
from kernels.attention import paged_attention, paged_attention_ref, paged_attention_triton
from kernels import arrival
from kernels.attention_decode import NewTokens, paged_decode_triton
from kernels.dispatch import sm_count
from kernels.gate_up_silu import gate_up_silu_ref, gate_up_silu_triton
from kernels import pdl
from kernels.linear import decode_split_k, linear, linear_triton
from kernels.rmsnorm import rmsnorm_ref, rmsnorm_triton
from kernels.rotary import rope_tables, rotary_cache_write_ref, rotary_cache_write_triton
from kernels.silu_mul import silu_mul_ref, silu_mul_triton

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DTYPES = [torch.bfloat16, torch.float16]
TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-5}
DEV = "cuda"


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def up(*tensors):
    return [t.double() for t in tensors]


@pytest.fixture(autouse=True)
def _poison_allocator():
    torch.manual_seed(0)
    for n in (1 << 10, 1 << 16, 1 << 20, 1 << 24, 1 << 27):  # small and large pools
        torch.empty(n, device=DEV).fill_(float("nan"))
    yield


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,H", [(1, 2048), (7, 4096), (512, 2048)])
def test_rmsnorm(dtype, T, H):
    x, res = torch.randn(T, H, device=DEV, dtype=dtype), torch.randn(T, H, device=DEV, dtype=dtype)
    w = (1 + 0.1 * torch.randn(H, device=DEV)).to(dtype)
    out, s = rmsnorm_triton(x, w, 1e-5, res)
    assert torch.equal(s, x + res)
    assert rel_err(out, rmsnorm_ref(*up(x, w), 1e-5, res.double())[0]) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,I", [(1, 8192), (512, 5632)])
def test_silu_mul(dtype, T, I):
    x = 3 * torch.randn(T, 2 * I, device=DEV, dtype=dtype)
    assert rel_err(silu_mul_triton(x), silu_mul_ref(x.double())) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("B,V", [(1, 128256), (8, 32000), (3, 49152)])
def test_argmax(dtype, B, V):
    logits = torch.randn(B, V, device=DEV).to(dtype)
    assert torch.equal(argmax(logits), torch.argmax(logits, dim=-1))


LINEAR_CASES = [(dt, n, k) for dt in DTYPES
                for n, k in ((2048, 2048), (2048, 8192), (8192, 2048), (3072, 2048))]
LINEAR_CASES.append((torch.float32, 2048, 2048))  # fp32 must not round operands to TF32


@pytest.mark.parametrize("T", [1, 4, 16, 512])
@pytest.mark.parametrize("dtype,N,K", LINEAR_CASES)
def test_linear(dtype, T, N, K):
    x = torch.randn(T, K, device=DEV, dtype=dtype)
    w = (torch.randn(N, K, device=DEV) / K ** 0.5).to(dtype)
    out = linear_triton(x, w)
    assert out.shape == (T, N) and out.dtype == dtype
    assert rel_err(out, x.double() @ w.double().T) < TOL[dtype]


GATE_UP_CASES = [(dt, i, k) for dt in DTYPES
                 for i, k in ((8192, 2048), (14336, 4096), (1000, 1000))]  # 1B, 8B, ragged
GATE_UP_CASES.append((torch.float32, 2048, 2048))


@pytest.mark.parametrize("T", [1, 4, 16, 512])  # fused decode kernel up to 16 rows
@pytest.mark.parametrize("dtype,I,K", GATE_UP_CASES)
def test_gate_up_silu(dtype, T, I, K):
    x = torch.randn(T, K, device=DEV, dtype=dtype)
    w13 = (torch.randn(2 * I, K, device=DEV) / K ** 0.5).to(dtype)
    out = gate_up_silu_triton(x, w13)
    assert out.shape == (T, I) and out.dtype == dtype
    assert rel_err(out, gate_up_silu_ref(*up(x, w13))) < TOL[dtype]


@pytest.mark.parametrize("T", [1, 9])
@pytest.mark.parametrize("dtype,N,K", [(torch.bfloat16, 1000, 1000), (torch.float32, 4096, 4096),
                                       (torch.float16, 333, 5000)])
def test_linear_split_k_ragged(monkeypatch, dtype, T, N, K):
    monkeypatch.setenv("LLAMA_TRITON_SPLITK", "1")  # on by default; whatever the environment says
    # small N takes the split-K decode path; K not a multiple of the split unit or the tile
    assert decode_split_k(N, K, sm_count(torch.device(DEV)))[0] > 1
    x = torch.randn(T, K, device=DEV, dtype=dtype)
    w = (torch.randn(N, K, device=DEV) / K ** 0.5).to(dtype)
    out = linear_triton(x, w)
    assert rel_err(out, x.double() @ w.double().T) < TOL[dtype]
    assert torch.equal(out, linear_triton(x, w))  # fixed-order reduction: deterministic


def test_linear_split_k_cuda_graph(monkeypatch):
    monkeypatch.setenv("LLAMA_TRITON_SPLITK", "1")
    x = torch.randn(1, 2048, device=DEV, dtype=torch.bfloat16)
    w = (torch.randn(2048, 2048, device=DEV) / 45).to(torch.bfloat16)
    want = linear_triton(x, w)  # autotunes outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = linear_triton(x, w)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert not torch.equal(out, want) and torch.equal(out, linear_triton(x, w))


@pytest.mark.parametrize("T", [1, 16])
def test_pdl_in_cuda_graph_changes_no_bit(monkeypatch, T):
    """The decode GEMVs with programmatic dependent launch, captured as a chain in which each
    reads what the one before wrote, give the results of the launches without PDL bit for bit,
    input after input."""
    if not pdl.pdl_enabled(torch.device(DEV)):
        pytest.skip("programmatic dependent launch needs compute capability 9 or newer")
    x = torch.randn(T, 2048, device=DEV, dtype=torch.bfloat16)
    wo = (torch.randn(2048, 2048, device=DEV) / 45).to(torch.bfloat16)
    w13 = (torch.randn(2 * 8192, 2048, device=DEV) / 45).to(torch.bfloat16)
    w2 = (torch.randn(2048, 8192, device=DEV) / 90).to(torch.bfloat16)

    def chain():  # wo -> gate+up with SiLU -> w2, 1B shapes
        return linear_triton(gate_up_silu_triton(linear_triton(x, wo), w13), w2)

    inputs = [torch.randn_like(x) for _ in range(3)]
    monkeypatch.setenv("LLAMA_TRITON_PDL", "0")
    want = []
    for value in inputs:  # the first call autotunes; the tuning is reused whatever the mode
        x.copy_(value)
        want.append(chain().clone())
    monkeypatch.setenv("LLAMA_TRITON_PDL", "1")
    assert pdl.pdl_args(x.device)["PDL"]
    assert torch.equal(chain(), want[-1])  # eager, and compiles the PDL kernels before capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = chain()
    for value, expected in zip(inputs, want):
        x.copy_(value)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,nq,nkv,hd", [(1, 32, 8, 64), (300, 32, 8, 128), (17, 16, 16, 64), (64, 32, 4, 128)])
def test_rotary_cache_write(dtype, T, nq, nkv, hd):
    qkv = torch.randn(T, (nq + 2 * nkv) * hd, device=DEV, dtype=dtype)
    positions = torch.randint(0, 4000, (T,), device=DEV, dtype=torch.int32)
    num_blocks, bs = T // 16 + 4, 16
    slots = torch.randperm(num_blocks * bs, device=DEV)[:T].to(torch.int32)
    caches = [torch.randn(num_blocks, bs, nkv, hd, device=DEV, dtype=dtype) for _ in range(2)]
    cos, sin = rope_tables(hd, 4096, 500000.0, {"rope_type": "llama3", "factor": 32.0,
                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}, DEV)
    results = []
    for fn, dt in ((rotary_cache_write_triton, dtype), (rotary_cache_write_ref, torch.float64)):
        # clone: .to() of the same dtype returns the input itself, which fn changes in place
        buf, kc, vc = qkv.to(dt).clone(), caches[0].to(dt).clone(), caches[1].to(dt).clone()
        q = buf[:, :nq * hd].view(T, nq, hd)
        k = buf[:, nq * hd:(nq + nkv) * hd].view(T, nkv, hd)
        v = buf[:, (nq + nkv) * hd:].view(T, nkv, hd)
        fn(q, k, v, positions, cos, sin, kc, vc, slots)
        results.append((buf, kc, vc))
    for got, want in zip(*results):
        assert rel_err(got, want) < TOL[dtype]


def _paged_batch(seq_lens, q_lens, n_heads, n_kv, hd, dtype, block_size=16):
    B = len(seq_lens)
    max_blocks = max(-(-n // block_size) for n in seq_lens) + 2
    num_blocks = B * max_blocks + 5
    kc = torch.randn(num_blocks, block_size, n_kv, hd, device=DEV, dtype=dtype)
    vc = torch.randn(num_blocks, block_size, n_kv, hd, device=DEV, dtype=dtype)
    bt = torch.randperm(num_blocks, device=DEV)[:B * max_blocks].view(B, max_blocks).to(torch.int32)
    qsl = torch.tensor([0] + q_lens, device=DEV).cumsum(0).to(torch.int32)
    q = torch.randn(int(qsl[-1]), n_heads + 2 * n_kv, hd, device=DEV, dtype=dtype)[:, :n_heads]
    return q, kc, vc, bt, torch.tensor(seq_lens, device=DEV, dtype=torch.int32), qsl


GQA = [(32, 32), (32, 8), (32, 4)]  # ratios 1, 4, 8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads,n_kv", GQA)
@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("max_seq_len", [None, 2048])
def test_paged_decode(dtype, n_heads, n_kv, hd, max_seq_len):
    lens = [1, 16, 17, 255, 256, 1000, 1999, 2000]
    q, kc, vc, bt, sl, qsl = _paged_batch(lens, [1] * len(lens), n_heads, n_kv, hd, dtype)
    out = paged_attention_triton(q, kc, vc, bt, sl, qsl, 1, hd ** -0.5, max_seq_len)
    ref = paged_attention_ref(*up(q, kc, vc), bt, sl, qsl, 1, hd ** -0.5)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("splits", [1, 7, 32])
def test_paged_decode_batch1_splits(splits):
    q, kc, vc, bt, sl, qsl = _paged_batch([1500], [1], 32, 8, 128, torch.bfloat16)
    out = paged_decode_triton(q, kc, vc, bt, sl, qsl, 128 ** -0.5, 2048, num_splits=splits)
    ref = paged_attention_ref(*up(q, kc, vc), bt, sl, qsl, 1, 128 ** -0.5)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def _decode_counters_at_zero():
    return all(not c.any() for bufs in arrival._arrival_counters.values() for c in bufs)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("splits", [None, 32])
@pytest.mark.parametrize("n_heads,n_kv", [(32, 8), (32, 32)])
def test_paged_decode_merge_by_last_split(batch, splits, n_heads, n_kv):
    """The last split program of each (sequence, kv head) merges the group's partials: lengths
    from one split to all of them, and from batch 3 a padding row (no query row). Runs again
    bit for bit, which a merge that read a partial before it was visible would break."""
    lens, q_lens = [2000, 1, 700, 1500, 64, 1999, 129, 1024][:batch], [1] * batch
    if batch >= 3:
        q_lens[2] = 0
    q, kc, vc, bt, sl, qsl = _paged_batch(lens, q_lens, n_heads, n_kv, 128, torch.bfloat16)
    args = (q, kc, vc, bt, sl, qsl, 128 ** -0.5, 2048)
    out = paged_decode_triton(*args, num_splits=splits)
    ref = paged_attention_ref(*up(q, kc, vc), bt, sl, qsl, 1, 128 ** -0.5)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    for _ in range(10):
        assert torch.equal(paged_decode_triton(*args, num_splits=splits), out)
    assert _decode_counters_at_zero()


def test_paged_decode_merge_cuda_graph():
    """Replays reuse the arrival counters without zeroing them: every launch must leave them at
    zero, and the buffer allocated before capture must still be the one in use."""
    q, kc, vc, bt, sl, qsl = _paged_batch([1800, 300, 5], [1, 1, 1], 32, 8, 128, torch.bfloat16)

    def decode():
        return paged_decode_triton(q, kc, vc, bt, sl, qsl, 128 ** -0.5, 2048, num_splits=16)
    decode()  # autotunes and allocates the counters outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = decode()
    for _ in range(3):
        q.copy_(torch.randn_like(q))
        g.replay()
        assert torch.equal(out, decode())
    ref = paged_attention_ref(*up(q, kc, vc), bt, sl, qsl, 1, 128 ** -0.5)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    assert _decode_counters_at_zero()


def _new_tokens(q, bt, sl, qsl, n_kv, block_size=16, max_positions=4096):
    """This step's k and v for each query row, at its sequence's last position and slot."""
    rows = [b for b in range(len(sl)) if qsl[b + 1] > qsl[b]]
    pos = (sl[rows] - 1).to(torch.int32)
    slots = (bt[rows, (pos // block_size).long()] * block_size + pos % block_size).to(torch.int32)
    kv = torch.randn(q.shape[0], 2, n_kv, q.shape[2], device=DEV, dtype=q.dtype)
    cos, sin = rope_tables(q.shape[2], max_positions, 500000.0, device=DEV)
    return NewTokens(kv[:, 0], kv[:, 1], pos, slots, cos, sin)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("splits", [None, 32])
@pytest.mark.parametrize("n_heads,n_kv", [(32, 8), (32, 32)])
def test_paged_decode_rotates_and_writes_new_tokens(batch, splits, n_heads, n_kv):
    """The decode kernel given the step's k and v: the caches as kernels.rotary's reference
    writes them, and attention over them, at lengths from one split to all, with padding."""
    lens, q_lens = [2000, 1, 700, 1500, 64, 1999, 129, 1024][:batch], [1] * batch
    if batch >= 3:
        q_lens[2] = 0
    q, kc, vc, bt, sl, qsl = _paged_batch(lens, q_lens, n_heads, n_kv, 128, torch.bfloat16)
    new = _new_tokens(q, bt, sl, qsl, n_kv)
    q_ref, kc_ref, vc_ref = q.clone(), kc.clone(), vc.clone()
    rotary_cache_write_ref(q_ref, new.k, new.v, new.positions, new.cos, new.sin, kc_ref, vc_ref,
                           new.slots)
    ref = paged_attention_ref(*up(q_ref, kc_ref, vc_ref), bt, sl, qsl, 1, 128 ** -0.5)
    out = paged_decode_triton(q, kc, vc, bt, sl, qsl, 128 ** -0.5, 2048, num_splits=splits,
                              new=new)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    assert rel_err(kc, kc_ref) < TOL[torch.bfloat16] and torch.equal(vc, vc_ref)
    for _ in range(5):  # the written slot is read back after it is written, in every run
        assert torch.equal(paged_decode_triton(q, kc, vc, bt, sl, qsl, 128 ** -0.5, 2048,
                                               num_splits=splits, new=new), out)
    assert _decode_counters_at_zero()


@pytest.mark.parametrize("with_new", [False, True])
def test_paged_decode_long_sequences_take_several_chunks(with_new):
    """Against the model's maximum length (131072): chunks of CHUNK, and far fewer programs per
    kv head (2 x SMs over 3 x 8 heads) than a 20000-long sequence has chunks, so each program
    takes several; shorter sequences beside it."""
    lens = [20000, 3000, 1]
    q, kc, vc, bt, sl, qsl = _paged_batch(lens, [1] * 3, 32, 8, 128, torch.bfloat16)
    new = _new_tokens(q, bt, sl, qsl, 8, max_positions=32768) if with_new else None
    q_ref, kc_ref, vc_ref = q.clone(), kc.clone(), vc.clone()
    if with_new:
        rotary_cache_write_ref(q_ref, new.k, new.v, new.positions, new.cos, new.sin, kc_ref,
                               vc_ref, new.slots)
    ref = paged_attention_ref(*up(q_ref, kc_ref, vc_ref), bt, sl, qsl, 1, 128 ** -0.5)
    out = paged_decode_triton(q, kc, vc, bt, sl, qsl, 128 ** -0.5, 131072, new=new)
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    assert _decode_counters_at_zero()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads,n_kv", GQA)
@pytest.mark.parametrize("hd", [64, 128])
def test_paged_prefill(dtype, n_heads, n_kv, hd):
    # fresh prompts, prompts extending cached prefixes (on/off block boundaries), a decode row
    seq_lens, q_lens = [512, 37, 900 + 100, 256 + 64, 1800], [512, 37, 100, 64, 1]
    q, kc, vc, bt, sl, qsl = _paged_batch(seq_lens, q_lens, n_heads, n_kv, hd, dtype)
    out = paged_attention_triton(q, kc, vc, bt, sl, qsl, 512, hd ** -0.5)
    ref = paged_attention_ref(*up(q, kc, vc), bt, sl, qsl, 512, hd ** -0.5)
    assert rel_err(out, ref) < TOL[dtype]


def test_torch_backend_forces_reference(monkeypatch):
    x = torch.randn(3, 256, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(512, 256, device=DEV, dtype=torch.bfloat16)
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "torch")
    assert torch.equal(linear(x, w), torch.nn.functional.linear(x, w))
    q, kc, vc, bt, sl, qsl = _paged_batch([40, 7], [1, 1], 8, 2, 64, torch.float16)
    assert torch.equal(paged_attention(q, kc, vc, bt, sl, qsl, 1, 0.125),
                       paged_attention_ref(q, kc, vc, bt, sl, qsl, 1, 0.125))
    monkeypatch.setenv("LLAMA_TRITON_BACKEND", "triton")
    assert rel_err(linear(x, w), x.double() @ w.double().T) < TOL[torch.bfloat16]
