"""The RMSNorm handoff between decode GEMVs (kernels/norm_handoff.py) on a real GPU: the kernels
at model shapes against PyTorch's RMSNorm in float64 (split-K and unsplit producers and
consumers, repeated bit for bit), and the engine with LLAMA_TRITON_NORM_HANDOFF=1 against the
engine without it."""
import pytest
import torch

from api.inference import LlamaGenerator
from kernels.gate_up_silu import gate_up_silu_triton
from kernels.linear import decode_split_k, linear_triton
from kernels.dispatch import sm_count
from kernels.norm_handoff import new_handoff
from tests.gpu.test_engine_gpu import _ids, _rel, _step_logits, hf_and_dir  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEV = "cuda"
TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-5}
EPS = 1e-5


def _rel64(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 16])
# (H, K, N): 1B wo -> wqkv and w2 -> w13; 8B wo -> wqkv; a 70B wo -> wqkv (an unsplit consumer);
# a 16384-wide producer (unsplit)
@pytest.mark.parametrize("H,K,N", [(2048, 2048, 3072), (2048, 8192, 16384), (4096, 4096, 6144),
                                   (8192, 8192, 10240), (16384, 2048, 2048)])
def test_handoff_at_model_shapes(dtype, M, H, K, N):
    g = torch.Generator(device=DEV).manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device=DEV, generator=g) * scale).to(dtype)
    x, w, res = rnd(M, K), rnd(H, K, scale=K ** -0.5), rnd(M, H)
    norm_w, w_next = rnd(H, scale=0.1) + 1, rnd(N, H, scale=H ** -0.5)
    made = new_handoff(M, H, dtype, DEV, EPS)
    h = linear_triton(x, w, handoff=(res, norm_w, made))
    want_h = x.double() @ w.double().T + res.double()
    normed = torch.nn.functional.rms_norm(want_h, (H,), norm_w.double(), EPS)
    out = linear_triton(made.scaled, w_next, rms=made)
    assert _rel64(h, want_h) < TOL[dtype]
    assert _rel64(out, normed @ w_next.double().T) < TOL[dtype]
    if N == 16384:  # the same pair as w2 -> gate+up
        y = gate_up_silu_triton(made.scaled, w_next, rms=made)
        gate_up = normed @ w_next.double().T
        want = torch.nn.functional.silu(gate_up[:, :N // 2]) * gate_up[:, N // 2:]
        assert _rel64(y, want) < TOL[dtype]
    again = new_handoff(M, H, dtype, DEV, EPS)
    assert torch.equal(linear_triton(x, w, handoff=(res, norm_w, again)), h)
    assert torch.equal(again.square_sums, made.square_sums)


def test_the_shapes_cover_split_and_unsplit_gemvs():
    sms = sm_count(torch.device(DEV))
    assert decode_split_k(2048, 2048, sms)[0] > 1  # 1B wo: a split-K producer
    if sms <= 132:
        assert decode_split_k(10240, 8192, sms)[0] == 1  # a 70B wqkv: an unsplit consumer
        assert decode_split_k(16384, 2048, sms)[0] == 1  # an unsplit producer


def test_engine_with_the_handoff_agrees_with_the_engine_without(hf_and_dir, monkeypatch):
    # bf16 decode steps replayed from graphs: the handoff rounds h times the norm weight where
    # the RMSNorm kernel rounds h / rms, so logits agree to bf16 noise, not bit for bit
    _, model_dir = hf_and_dir
    prompt = _ids(30, seed=3)
    runs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("LLAMA_TRITON_NORM_HANDOFF", mode)
        gen = LlamaGenerator(model_dir, device="cuda", dtype="bfloat16")
        runs[mode] = _step_logits(gen.engine, prompt, 12)
    assert _rel(runs["1"], runs["0"]) < 3e-2


def test_graph_and_eager_decode_give_the_same_tokens_with_the_handoff(hf_and_dir, monkeypatch):
    monkeypatch.setenv("LLAMA_TRITON_NORM_HANDOFF", "1")
    _, model_dir = hf_and_dir
    graphs = LlamaGenerator(model_dir, device="cuda", dtype="float32")
    eager = LlamaGenerator(model_dir, device="cuda", dtype="float32", cuda_graphs=False)
    for p in (_ids(5, seed=5), _ids(40, seed=40)):
        assert graphs.generate_ids(p, 32) == eager.generate_ids(p, 32)
