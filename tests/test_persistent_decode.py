"""The persistent batch-1 decode step without a GPU: where it may run and why not (each reason's
message), the work split its slots follow, the weight restacking, and the kernel compiled for
sm_90 through ptxas. Its results are checked on a Hopper GPU (tests/gpu)."""
import dataclasses

import pytest
import torch

from bench.random_model import random_state_dict
from bench.shapes import SHAPES
from graph.config import LlamaConfig
from graph.llama import LlamaModel
from runtime import persistent_decode as pd
from runtime.engine import make_engine
from runtime.kv_cache import PagedKVCache
from tests.helpers.sm90_compile import compile_for_sm90

SMALL = LlamaConfig(vocab_size=16384, hidden_size=512, intermediate_size=1536,
                    num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                    head_dim=64, max_position_embeddings=256, rope_theta=10000.0)


@pytest.mark.parametrize("n, k, programs", [(3072, 2048, 132), (4096, 14336, 132),
                                            (512, 512, 132), (128256, 4096, 132), (640, 256, 7)])
def test_writers_per_block_counts_the_programs_over_each_block(n, k, programs):
    """The kernel's split: `units` (row block, K chunk) pairs in row-major order, program p
    taking [units * p // P, units * (p + 1) // P). Brute force over that split."""
    chunks = k // pd.BLOCK_K
    units = n // pd.BLOCK_N * chunks
    owners = [p for p in range(programs)
              for _ in range(units * p // programs, units * (p + 1) // programs)]
    assert [pd.owner(u, units, programs) for u in range(units)] == owners
    spans = [owners[b * chunks + chunks - 1] - owners[b * chunks] + 1
             for b in range(n // pd.BLOCK_N)]
    assert pd.writers_per_block(n, k, programs) == max(spans)


def test_rows_per_load_divides_both_rows():
    assert pd.rows_per_load(SHAPES["8b"]) == 16        # 4096 and 14336 columns: 32 and 112 chunks
    assert pd.rows_per_load(SMALL) == 4                 # 512 columns: 4 chunks
    # 4 and 5 chunks: one at a time, or the last chunk of the 640 would never be staged
    assert pd.rows_per_load(dataclasses.replace(SMALL, intermediate_size=640)) == 1


@pytest.mark.parametrize("change, message", [
    (dict(vocab_size=16400), "vocab_size=16400 is not a multiple of the 64-row weight tile"),
    (dict(intermediate_size=1560), "intermediate_size=1560 is not a multiple of the 64-row"),
    (dict(intermediate_size=1600), "intermediate_size=1600 is not a multiple of the 128-column"),
    (dict(num_attention_heads=4, head_dim=64), "query heads' width 256 is not hidden_size=512"),
    (dict(num_attention_heads=2, num_key_value_heads=2, head_dim=256, intermediate_size=1536),
     None),
    (dict(num_attention_heads=16, num_key_value_heads=16, head_dim=32), None),
    (dict(num_attention_heads=64, num_key_value_heads=64, head_dim=8), "head_dim=8 is not a"),
    (dict(vocab_size=4096), "vocab_size=4096 is too small for 132 programs"),
])
def test_shape_problems_say_which_limit(change, message):
    problem = pd.shape_problem(dataclasses.replace(SMALL, **change), 132)
    if message is None:
        assert problem is None
    else:
        assert message in problem


def _cpu_model(config=SMALL, dtype=torch.float32, layers=None):
    devices = layers or [torch.device("cpu")] * config.num_hidden_layers
    return LlamaModel(config, random_state_dict(config, "cpu", dtype), devices, dtype)


def test_why_not_names_the_first_reason(monkeypatch):
    monkeypatch.setenv("LLAMA_TRITON_PERSISTENT", "0")
    model = _cpu_model(dtype=torch.bfloat16)
    assert "switched off (LLAMA_TRITON_PERSISTENT=0)" in pd.why_not(model, 132)
    monkeypatch.delenv("LLAMA_TRITON_PERSISTENT")   # on by default
    assert "does not run Triton kernels here" in pd.why_not(model, 132)
    assert pd.writers_per_block(SMALL.vocab_size, SMALL.hidden_size, 1000) > 2
    assert "too small for 1000 programs" in pd.why_not(model, 1000)
    assert "not torch.float32" in pd.why_not(_cpu_model(), 132)
    split = _cpu_model(layers=[torch.device("cpu"), torch.device("meta")])
    assert "split over several devices" in pd.why_not(split, 132)
    monkeypatch.setenv("LLAMA_TRITON_PERSISTENT", "yes")
    with pytest.raises(ValueError, match="LLAMA_TRITON_PERSISTENT='yes' is not one of"):
        pd.why_not(model, 132)


def test_no_persistent_step_on_the_cpu(monkeypatch, recwarn):
    monkeypatch.delenv("LLAMA_TRITON_PERSISTENT", raising=False)
    model = _cpu_model(dtype=torch.bfloat16)
    cache = PagedKVCache(8, 16, SMALL.num_key_value_heads, SMALL.head_dim, torch.bfloat16,
                         model.layer_devices)
    assert pd.make_persistent_decode(model, cache) is None
    engine = make_engine(model, cache, eos_ids=[])
    assert engine.persistent is None and engine.graphs is None
    assert not recwarn.list   # on by default: where it cannot run, nothing to say


def test_asking_for_the_persistent_step_where_it_cannot_run_warns(monkeypatch):
    monkeypatch.setenv("LLAMA_TRITON_PERSISTENT", "1")
    model = _cpu_model(dtype=torch.bfloat16)
    cache = PagedKVCache(8, 16, SMALL.num_key_value_heads, SMALL.head_dim, torch.bfloat16,
                         model.layer_devices)
    with pytest.warns(UserWarning, match="LLAMA_TRITON_PERSISTENT=1, but the persistent decode "
                                         "step cannot run: the model is on cpu, not a CUDA GPU"):
        engine = make_engine(model, cache, eos_ids=[])
    assert engine.persistent is None


@pytest.mark.parametrize("shape, programs", [("8b", 132), ("1b", 132), ("8b", 16), ("1b", 7)])
def test_w2_chunks_holds_every_programs_chunks(shape, programs):
    """Brute force over the kernel's split of w2 ([hidden, intermediate]): the distinct K
    chunks of each program's units, which _stage_silu packs into the staged row."""
    config = SHAPES[shape]
    chunks = config.intermediate_size // pd.BLOCK_K
    units = config.hidden_size // pd.BLOCK_N * chunks
    most = max(len({u % chunks for u in range(units * p // programs,
                                               units * (p + 1) // programs)})
               for p in range(programs))
    rows = pd.rows_per_load(config)
    assert most <= pd.w2_chunks(config, programs) < most + rows
    assert pd.w2_chunks(config, programs) % rows == 0


def test_the_ring_is_as_deep_as_shared_memory_allows():
    hopper = pd.HOPPER_SHARED_BYTES
    # 8B: two hidden rows are 64 chunks and a program's w2 units multiply at most 55 of the
    # 112, so w2's input is packed into 64 chunks (16 KB): 13 tiles of 16 KB instead of 11
    assert pd.w2_chunks(SHAPES["8b"], 132) == 64
    assert pd.row_chunks(SHAPES["8b"], 132, 2, hopper) == 64
    assert pd.ring_stages(SHAPES["8b"], 2, hopper, 132) == 13
    # 1B: packing (32 chunks) would leave no room for a 14th tile, so the row stays whole
    assert pd.w2_chunks(SHAPES["1b"], 132) == 16
    assert pd.row_chunks(SHAPES["1b"], 132, 2, hopper) == 64
    assert pd.ring_stages(SHAPES["1b"], 2, hopper, 132) == 13 < pd.MAX_STAGES
    # on 16 programs each multiplies the whole intermediate row: nothing to pack
    assert pd.row_chunks(SHAPES["8b"], 16, 2, hopper) == 128
    assert pd.row_chunks(SMALL, 132, 2, hopper) == 16
    # a short intermediate row: room for a normed hidden row and its norm's weights
    short = dataclasses.replace(SMALL, intermediate_size=512)
    assert pd.row_chunks(short, 132, 2, hopper) == 8
    # consumer Blackwell's 99 KB: the packed 8B row leaves 5 tiles; 80 KB too few
    assert pd.ring_stages(SHAPES["8b"], 2, 99 * 1024, 132) == 5
    assert pd.ring_stages(SHAPES["8b"], 2, 80 * 1024, 132) < pd.MIN_STAGES
    # the cap on copies in flight leaves every ring that may run room for landed tiles
    assert 1 <= pd.COPIES_IN_FLIGHT < pd.MIN_STAGES


def test_too_little_shared_memory_is_a_reason(monkeypatch):
    monkeypatch.delenv("LLAMA_TRITON_PERSISTENT", raising=False)
    monkeypatch.setattr(pd, "use_triton", lambda tensor: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (12, 0))
    monkeypatch.setattr(pd, "shared_memory_per_block", lambda device: 56 * 1024)
    model = _cpu_model(dtype=torch.bfloat16)   # a 4 KB row: room for 3 tiles of 16 KB
    assert pd.why_not(model, 132) == ("its staged row and a ring of 4 weight tiles do not fit "
                                      "in the 56 KB of shared memory a block may use here")
    monkeypatch.setattr(pd, "shared_memory_per_block", lambda device: 72 * 1024)
    assert pd.why_not(model, 132) is None


@pytest.mark.parametrize("props, expected", [
    (dict(shared_memory_per_block_optin=101376), 101376), (dict(), pd.HOPPER_SHARED_BYTES)])
def test_shared_memory_per_block_reads_the_device(monkeypatch, props, expected):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("Props", (), props)())
    assert pd.shared_memory_per_block(torch.device("cuda", 0)) == expected


def test_longest_context_is_eight_attention_tiles_a_unit():
    # an H100/H200 has 132 SMs: 32 query heads get 4 splits each, of up to 8 tiles
    assert pd.TILES_PER_UNIT == 8
    assert pd.longest_context(SHAPES["1b"], 132) == 8 * 4 * 128   # head_dim 64: 128 positions
    assert pd.longest_context(SHAPES["8b"], 132) == 8 * 4 * 64    # head_dim 128: 64 positions
    assert pd.longest_context(SMALL, 132) == 8 * 16 * 128         # 8 heads: 16 splits
    assert pd.attention_splits(200, 132) == 1   # more heads than programs: one split each


def test_stack_layers_leaves_the_layers_views_of_one_tensor():
    model = _cpu_model()
    before = [layer["attention.wo"].clone() for layer in model.layers]
    stacked = pd.stack_layers(model, "attention.wo")
    assert torch.equal(stacked, torch.cat(before))
    for i, layer in enumerate(model.layers):
        assert torch.equal(layer["attention.wo"], before[i])
        rows = before[0].shape[0]
        assert layer["attention.wo"].data_ptr() == stacked[i * rows].data_ptr()


def test_kernel_compiles_for_sm90(tmp_path):
    """The kernel only runs on a Hopper GPU (tests/gpu); here it is compiled for one at the 8B
    shape: five weight streams by TMA in the loader warp (four a layer and the head), the
    register split, acquire waits and release counts, the head's fp32 atomics, cross-program
    reads from L2, the cap on copies in flight, and the deepest ring the host chooses within a
    Hopper block's shared memory."""
    types = dict(ids_ptr="*i64", pos_ptr="*i64", slot_ptr="*i64", len_ptr="*i64",
                 table_ptr="*i64", embed_ptr="*bf16", attn_norm_ptr="*bf16",
                 ffn_norm_ptr="*bf16", final_norm_ptr="*bf16", kv_ptr="*bf16",
                 arrivals_ptr="*i32", counter_ptr="*i32", table_stride="i32",
                 layer_stride="i64", v_offset="i64", eps="fp32", scale="fp32", L="i32")
    for name in ("cos_ptr", "sin_ptr", "qkv_slots", "wo_slots", "gu_slots", "w2_slots",
                 "res_in_ptr", "res_mid_ptr", "attn_ptr", "acc_ptr", "ml_ptr", "logits_ptr"):
        types[name] = "*fp32"
    stages = pd.ring_stages(SHAPES["8b"], 2, pd.HOPPER_SHARED_BYTES, 132)
    found = compile_for_sm90(tmp_path, "kernels.persistent_decode", "persistent_decode_kernel",
                             types, dict(P=132, H=4096, NQKV=6144, I=14336, V=128256, NH=32, NKV=8,
                                         D=128, BS=16, SPLITS=4, TILE=64, S_QKV=3, S_WO=3,
                                         S_GU=2, S_W2=3, BN=64, BK=128, ROWS=16, STAGES=stages,
                                         IN_FLIGHT=pd.COPIES_IN_FLIGHT,
                                         X_CHUNKS=pd.row_chunks(SHAPES["8b"], 132, 2,
                                                                pd.HOPPER_SHARED_BYTES),
                                         num_warps=8))
    assert found["tma loads"] == 5
    # each of the five streams: the loader waits for a free slot and for the copy IN_FLIGHT
    # back to land, the compute warps for each tile
    assert found["slot waits"] >= 15 and found["slot releases"] >= 1
    assert found["register split"] >= 2
    assert found["acquire"] >= 1 and found["release"] >= 2
    assert found["f32 atomic adds"] >= 1 and found["L2-only loads"] >= 1
    assert found["shared"] <= pd.HOPPER_SHARED_BYTES
