"""bench/persistent_chain.py without a GPU: its shape checks, its error check, the engine-kernel
chain it times against, and the persistent kernel compiled for sm_90 (through ptxas)."""
from types import SimpleNamespace

import pytest
import torch

from bench import persistent_chain as pc
from tests.helpers.sm90_compile import compile_for_sm90

H, NQKV, I, LAYERS = 2048, 3072, 4096, 2


def weights(dtype=torch.bfloat16):
    return pc.random_chain_weights(H, NQKV, I, LAYERS, torch.device("cpu"), dtype)


@pytest.mark.parametrize("index, shape, message", [
    (1, (LAYERS * H, H + 8), "wo is (4096, 2056)"),
    (2, (LAYERS * I, H), "must be [16384, 2048]"),
    (0, (LAYERS * 3000, H), "wqkv has 3000 rows a layer, not a multiple of block_n=64"),
])
def test_shape_errors_name_the_weight(index, shape, message):
    ws = list(weights())
    ws[index] = torch.zeros(shape, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        pc.check_shapes(*ws, LAYERS, 64, 128)


def test_dtype_and_k_tiling_errors():
    ws = list(weights())
    ws[3] = ws[3].float()
    with pytest.raises(ValueError, match="w2 is torch.float32; the chain streams bf16 or fp16"):
        pc.check_shapes(*ws, LAYERS, 64, 128)
    with pytest.raises(ValueError, match="H=2048 must be a multiple of 4096"):
        pc.check_shapes(*weights(), LAYERS, 64, 256)
    ws = list(weights())
    ws[0] = ws[0][:LAYERS * 1024]
    with pytest.raises(ValueError, match="wqkv has 1024 rows a layer; wo reads the first H=2048"):
        pc.check_shapes(*ws, LAYERS, 64, 128)
    pc.check_shapes(*weights(torch.float16), LAYERS, 64, 128)  # a shape it runs


def fake_chain(x0, wqkv, wo, w13, w2):
    """What a correct launch leaves in the buffers, computed with torch in x0's dtype."""
    qkv, o, gu, y = [], [], [], []
    x = x0
    for layer in range(LAYERS):
        qkv.append(wqkv[layer * NQKV:(layer + 1) * NQKV].to(x.dtype) @ x)
        o.append(wo[layer * H:(layer + 1) * H].to(x.dtype) @ qkv[-1][:H])
        gu.append(w13[layer * 2 * I:(layer + 1) * 2 * I].to(x.dtype) @ o[-1])
        h = torch.nn.functional.silu(gu[-1][:I]) * gu[-1][I:]
        x = w2[layer * H:(layer + 1) * H].to(x.dtype) @ h
        y.append(x)
    return SimpleNamespace(layers=LAYERS, H=H, I=I, NQKV=NQKV, qkv=torch.stack(qkv),
                           o=torch.stack(o), gu=torch.stack(gu), y=torch.stack(y))


def test_error_check_passes_right_outputs_and_catches_wrong_ones():
    ws = weights()
    x0 = torch.randn(H)
    chain = fake_chain(x0, *ws)
    assert pc.worst_op_error(chain, x0, *ws) < 1e-5
    chain.o[1, 5] += 1.0  # one wrong element of one op
    assert pc.worst_op_error(chain, x0, *ws) > 1e-3
    chain = fake_chain(x0, *ws)
    chain.gu[0, 7] = float("nan")  # a NaN where the reference is finite
    assert pc.worst_op_error(chain, x0, *ws) == float("inf")
    chain = fake_chain(x0, *ws)
    chain.y[1].zero_()  # an op that wrote nothing
    assert pc.worst_op_error(chain, x0, *ws) > 0.9
    tiny = x0 * 1e-30  # a row shrunk past fp32's products: its ops are not judged
    chain = fake_chain(tiny, *ws)
    chain.y.zero_()
    assert pc.worst_op_error(chain, tiny, *ws) == 0.0


def test_engine_chain_matches_the_torch_chain():
    ws = weights(torch.float32)
    x0 = torch.randn(H)
    want = fake_chain(x0.double(), *(w.double() for w in ws)).y[-1]
    got = pc.engine_chain(x0, *ws, LAYERS)[0].double()
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_benchmark_refuses_without_a_hopper_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a Hopper or newer CUDA GPU"):
        pc.main(["--shapes", "1b"])


def test_kernel_compiles_for_sm90_with_a_tma_loader_warp(tmp_path):
    """The kernel only runs on a Hopper GPU (tests/gpu); here it is compiled for one. Its four
    weight streams are TMA loads in the loader partition (one per op), the partitions split the
    registers, and the compute warps wait with acquire loads and release with one atomic per op."""
    types = {n: "*fp32" for n in ("x0_ptr", "qkv_ptr", "o_ptr", "gu_ptr", "y_ptr")}
    found = compile_for_sm90(tmp_path, "bench.persistent_chain", "persistent_chain_kernel",
                             {**types, "counter_ptr": "*i32", "L": "i32"},
                             dict(P=132, H=2048, NQKV=3072, I=8192, BN=64, BK=128, STAGES=8,
                                  ROWS=pc.X_ROWS_PER_LOAD, X_CHUNKS=64, num_warps=8))
    assert found["tma loads"] == 4
    assert found["slot waits"] >= 2 and found["slot releases"] >= 1
    assert found["register split"] >= 2
    assert found["acquire"] >= 1 and found["release"] >= 1 and found["f32 atomic adds"] >= 1
    assert found["shared"] <= 227 * 1024
