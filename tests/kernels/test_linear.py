import pytest
import torch
import triton

from conftest import TOL, rel_err
from kernels import arrival, linear as linear_mod
from kernels.linear import SPLIT_UNIT, decode_split_k, linear, linear_ref, linear_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 3, 16, 17, 70])  # decode kernel up to 16 rows, tiled GEMM above
@pytest.mark.parametrize("N,K", [(48, 64), (100, 72)])  # off-tile N and K exercise the masks
@pytest.mark.parametrize("split_k", ["0", "1"])  # small N: split at decode unless switched off
def test_linear_triton_matches_ref(monkeypatch, dtype, T, N, K, split_k):
    monkeypatch.setenv("LLAMA_TRITON_SPLITK", split_k)
    x = torch.randn(T, K, dtype=dtype)
    w = torch.randn(N, K, dtype=dtype) / K ** 0.5
    out = linear_triton(x, w)
    assert out.shape == (T, N) and out.dtype == dtype
    ref = linear_ref(x.double(), w.double())
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("N,K", [(48, 64), (100, 72)])
def test_small_n_decode_splits_k(monkeypatch, N, K):
    # the interpreter reports 4 SMs: these shapes must take the split-K path, the second with a
    # ragged last split (72 = 2 * 32 + 8)
    split, per = decode_split_k(N, K, 4)
    assert split > 1 and per % SPLIT_UNIT == 0 and (split - 1) * per < K <= split * per
    monkeypatch.setenv("LLAMA_TRITON_SPLITK", "1")  # the heuristic's own split, end to end
    x, w = torch.randn(2, K), torch.randn(N, K) / K ** 0.5
    assert rel_err(linear_triton(x, w), x.double() @ w.double().T) < TOL[torch.float32]


def test_big_n_decode_does_not_split():
    assert decode_split_k(128256, 2048, 132) == (1, 2048)  # lm_head: N alone fills the GPU
    assert decode_split_k(16384, 2048, 132) == (1, 2048)
    assert decode_split_k(2048, 2048, 132)[0] > 1
    split, per = decode_split_k(3072, 2048, 132)
    assert split * triton.cdiv(3072, 64) >= 2 * 132 and per % SPLIT_UNIT == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T", [1, 5, 16])
@pytest.mark.parametrize("N,K,split", [(40, 96, 3), (70, 100, 4), (33, 130, 2), (20, 200, 7)])
def test_linear_split_k_forced(monkeypatch, dtype, T, N, K, split):
    # any requested split, rounded to whole SPLIT_UNIT chunks; ragged N and K; strided rows
    want = linear_mod._round_split(split, K)
    assert want[0] > 1
    monkeypatch.setenv("LLAMA_TRITON_SPLITK", "1")
    monkeypatch.setattr(linear_mod, "decode_split_k", lambda n, k, sms: want)
    x = torch.randn(T, K + 8, dtype=dtype)[:, 3:K + 3]
    w = torch.randn(N, K, dtype=dtype) / K ** 0.5
    out = linear_triton(x, w)
    assert out.shape == (T, N) and out.dtype == dtype
    assert rel_err(out, linear_ref(x.double(), w.double())) < TOL[dtype]


def test_linear_split_k_is_deterministic(monkeypatch):
    _force_split(monkeypatch, 3)
    x, w = torch.randn(2, 96), torch.randn(24, 96)
    assert torch.equal(linear_triton(x, w), linear_triton(x, w))


def test_linear_triton_strided_input():
    x = torch.randn(4, 96)[:, 16:80]  # row stride 96, not K
    w = torch.randn(40, 64)
    assert rel_err(linear_triton(x, w), x.double() @ w.double().T) < 1e-5


@pytest.mark.parametrize("T", [1, 40])   # the decode kernel and the tiled GEMM
def test_float32_output_from_fp16_inputs(T):
    """The head writes float32 logits straight from the accumulator, not rounded to fp16 first."""
    x = torch.randn(T, 64, dtype=torch.float16)
    w = torch.randn(48, 64, dtype=torch.float16) / 8
    out = linear_triton(x, w, out_dtype=torch.float32)
    ref = x.double() @ w.double().T
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5 < rel_err(linear_triton(x, w), ref)
    assert linear(x.float(), w.float(), out_dtype=torch.float64).dtype == torch.float64


def test_linear_public_dispatch(monkeypatch):
    import importlib
    mod = importlib.import_module("kernels.linear")
    monkeypatch.setattr(mod, "linear_triton", lambda *a: pytest.fail("Triton on a CPU tensor"))
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    assert torch.equal(linear(x, w), x @ w.T)


def test_fp32_prefill_keeps_only_mid_size_tiles():
    configs = linear_mod._prefill_configs()
    fp32 = linear_mod._fp32_prefill_prune(configs, {"x_ptr": torch.zeros(1)})
    assert fp32 and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 128 for c in fp32)
    assert linear_mod._fp32_prefill_prune(configs, {"x_ptr": torch.zeros(1).half()}) == configs


@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("T", [1, 5])
def test_cpu_layout_gives_the_plain_product(parts, T):
    # the CPU stores weights as `parts` K-major chunks of output rows; the product is unchanged
    w, x = torch.randn(12, 40, dtype=torch.float64), torch.randn(T, 40, dtype=torch.float64)
    packed = linear_mod.cpu_layout(w, parts)
    assert packed.shape == (parts, 40, 12 // parts) and packed.is_contiguous()
    assert torch.allclose(linear_ref(x, packed), x @ w.T, rtol=1e-12, atol=1e-12)


def test_cpu_weights_are_cut_per_thread(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert [linear_mod.cpu_parts(n) for n in (576, 960, 49155, 7)] == [4, 4, 3, 1]


def _force_split(monkeypatch, split):
    monkeypatch.setenv("LLAMA_TRITON_SPLITK", "1")
    monkeypatch.setattr(linear_mod, "decode_split_k",
                        lambda n, k, sms: linear_mod._round_split(split, k))


def test_split_k_sum_ignores_which_program_ends_last(monkeypatch, shuffle_programs):
    """Each column block's last program sums the partials in split order: with the programs run
    in any order, the same bits, and every arrival counter back at zero."""
    _force_split(monkeypatch, 4)
    x = torch.randn(3, 200, dtype=torch.float16)
    w = torch.randn(70, 200, dtype=torch.float16) / 14
    in_order = linear_triton(x, w)
    shuffle_programs()
    for _ in range(3):
        assert torch.equal(linear_triton(x, w), in_order)
    assert all(not c.any() for c in arrival._arrival_counters[torch.device("cpu")])
    assert rel_err(in_order, linear_ref(x.double(), w.double())) < TOL[torch.float16]


def test_split_k_switch(monkeypatch):
    calls = []
    monkeypatch.setattr(linear_mod, "_launch_decode",
                        lambda x, w, out, split, per, **options: calls.append(split))
    x, w = torch.randn(1, 96), torch.randn(24, 96)  # small N: the heuristic splits it
    for value, split in (("0", 1), ("1", decode_split_k(24, 96, 4)[0])):
        monkeypatch.setenv("LLAMA_TRITON_SPLITK", value)
        linear_triton(x, w)
        assert calls[-1] == split
    monkeypatch.setenv("LLAMA_TRITON_SPLITK", "yes")
    with pytest.raises(ValueError, match="LLAMA_TRITON_SPLITK='yes' is not one of '0', '1'"):
        linear_triton(x, w)


@pytest.mark.parametrize("switch,split,want_partials", [("1", 3, True), ("0", 3, False),
                                                        ("1", 1, False), (None, 3, True)])
def test_sum_later_returns_partials_only_when_switched_on_and_split(monkeypatch, switch, split,
                                                                    want_partials):
    """linear(..., sum_later=True) leaves a split-K GEMV's partials unsummed where
    LLAMA_TRITON_SUM_LATER is 1 or unset; their sum in split order is the summed GEMV's output,
    bit for bit."""
    _force_split(monkeypatch, split)
    monkeypatch.setattr(linear_mod, "use_triton", lambda t: True)  # Triton, interpreted
    if switch is None:
        monkeypatch.delenv("LLAMA_TRITON_SUM_LATER", raising=False)
    else:
        monkeypatch.setenv("LLAMA_TRITON_SUM_LATER", switch)
    x, w = torch.randn(3, 384, dtype=torch.float16), torch.randn(40, 384, dtype=torch.float16)
    got = linear(x, w, sum_later=True)
    want = linear(x, w)
    assert isinstance(got, linear_mod.SplitPartials) is want_partials
    if want_partials:
        assert got.parts.shape == (3, 3, 40) and got.dtype == torch.float16
        assert got.shape == (3, 40) and got.device == x.device
        total = torch.zeros(3, 40)
        for part in got.parts:
            total += part
        assert torch.equal(total.to(torch.float16), want)
    else:
        assert torch.equal(got, want)
