"""The batch-1 decode step as one persistent launch (kernels/persistent_decode.py), where it can
run: a Hopper or newer GPU, triton with Gluon, bf16 or fp16 weights, the whole model on one
device and shapes the kernel tiles, and a sequence no longer than `longest_context`. Everywhere
else the step runs the per-op kernels, as before. It is on by default; `LLAMA_TRITON_PERSISTENT=0`
turns it off (A/B runs), `=1` also warns where it cannot run.

The step itself (CUDA-only) is runtime/persistent_step.py; this module decides where it runs.
Building one restacks each weight kind of all layers into one tensor (the kernel streams it
through one TMA descriptor) and points the model's per-layer weights at views of it, so the
memory is the same and the per-op path still works on the same bytes."""
from __future__ import annotations

import importlib.util
import math
import os
import warnings
from typing import TYPE_CHECKING

import torch
import triton

from graph.llama import LlamaModel
from kernels.dispatch import switched_on, use_triton
from runtime.kv_cache import PagedKVCache

if TYPE_CHECKING:  # imported for real only where the step is built (CUDA-only code)
    from runtime.persistent_step import PersistentDecode

SWITCH = "LLAMA_TRITON_PERSISTENT"
ON_BY_DEFAULT = True   # faster than the per-op kernels on an H200 at 1B and 8B (bench/RESULTS.md)
BLOCK_N, BLOCK_K, NUM_WARPS = 64, 128, 8
# weight tiles in the ring: as many as shared memory holds beside the staged row, within these
MIN_STAGES, MAX_STAGES = 4, 16
SCRATCH_BYTES = 3072   # the ring's mbarriers and the compiler's scratch (1.2-2.2 KB, sm_90)
# weight copies a program keeps on their way: enough to keep DRAM busy, few enough that its
# grid waits and activation loads, which queue behind them, stay short (H200, session 15)
COPIES_IN_FLIGHT = 3
HOPPER_SHARED_BYTES = 227 * 1024   # the shared memory a block may opt in to on a Hopper SM
MAX_ROWS_PER_LOAD = 16   # K chunks of the input row staged into shared memory per load
# positions x head_dim of one attention tile: 128 positions at head_dim 64, 64 at 128
ATTN_TILE_ELEMENTS = 8192
# attention tiles one (query head, split) unit may walk in turn: up to 8 the step beat the per-op
# kernels on an H200 (even at 1B's 4096 positions, 3% at 8B's 2048); at 16 it lost 9% (session 15)
TILES_PER_UNIT = 8
WEIGHTS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")
NORMS = ("attention_norm", "ffn_norm")


def owner(unit: int, units: int, programs: int) -> int:
    """The program whose equal contiguous share of `units` holds `unit` (as the kernel splits)."""
    return ((unit + 1) * programs + units - 1) // units - 1


def writers_per_block(n: int, k: int, programs: int) -> int:
    """The most programs that add into one row block of an [n, k] GEMV: the slots it needs."""
    chunks = k // BLOCK_K
    units = n // BLOCK_N * chunks
    return max(owner(b * chunks + chunks - 1, units, programs) - owner(b * chunks, units, programs)
               + 1 for b in range(n // BLOCK_N))


def attention_splits(heads: int, programs: int) -> int:
    """The most programs that share one query head's positions: every head's splits fit in one
    wave of programs, so a long context makes each split longer rather than adding waves."""
    return max(1, programs // heads)


def attention_tile(config) -> int:
    """Positions of one attention tile of the kernel."""
    return ATTN_TILE_ELEMENTS // config.head_dim


def longest_context(config, programs: int) -> int:
    """The longest sequence the persistent step decodes: TILES_PER_UNIT attention tiles a
    (query head, split) unit. Each unit walks its tiles in turn while most programs wait, so
    past that the per-op kernels, which spread a long context over more programs, are faster."""
    splits = attention_splits(config.num_attention_heads, programs)
    return TILES_PER_UNIT * splits * attention_tile(config)


def w2_chunks(config, programs: int) -> int:
    """The most K chunks of w2's input one program's units multiply, in whole staging loads:
    a program stages only those (kernels/persistent_decode._stage_silu)."""
    chunks = config.intermediate_size // BLOCK_K
    units = config.hidden_size // BLOCK_N * chunks
    needed = min(chunks, -(-units // programs))
    rows = rows_per_load(config)
    return -(-needed // rows) * rows


def _tiles_beside(chunks: int, itemsize: int, shared_bytes: int) -> int:
    """Weight tiles that fit in a block's shared memory beside a staged row of `chunks`."""
    free = shared_bytes - SCRATCH_BYTES - chunks * BLOCK_K * itemsize
    return min(MAX_STAGES, free // (BLOCK_N * BLOCK_K * itemsize))


def row_chunks(config, programs: int, itemsize: int, shared_bytes: int) -> int:
    """BK-column chunks of the staged row, to a power of two. It holds two hidden rows (a normed
    row and its norm's weights) and w2's input: the whole intermediate row, or only the chunks
    one program multiplies (w2_chunks, packed) where that leaves room for a deeper ring. At 8B
    on a Hopper GPU packing gives 13 tiles instead of 11; at 1B it would give none more, and
    measured slower (H200, session 16)."""
    hidden = 2 * config.hidden_size // BLOCK_K
    whole = triton.next_power_of_2(max(hidden, config.intermediate_size // BLOCK_K))
    packed = triton.next_power_of_2(max(hidden, w2_chunks(config, programs)))
    if _tiles_beside(packed, itemsize, shared_bytes) > _tiles_beside(whole, itemsize,
                                                                     shared_bytes):
        return packed
    return whole


def ring_stages(config, itemsize: int, shared_bytes: int, programs: int) -> int:
    """The deepest weight ring (at most MAX_STAGES tiles) that fits in a block's `shared_bytes`
    beside the staged row (held in the weights' dtype): the deeper the ring, the longer the
    loader keeps streaming while attention or a grid wait holds the compute warps."""
    chunks = row_chunks(config, programs, itemsize, shared_bytes)
    return _tiles_beside(chunks, itemsize, shared_bytes)


def rows_per_load(config) -> int:
    """K chunks staged per load: a power of two that divides both rows' chunk counts."""
    chunks = math.gcd(config.hidden_size // BLOCK_K, config.intermediate_size // BLOCK_K)
    rows = MAX_ROWS_PER_LOAD
    while rows > 1 and chunks % rows:
        rows //= 2
    return rows


def why_not(model: LlamaModel, programs: int) -> str | None:
    """None where the persistent step can run this model on `programs` SMs; else why not, in
    words. The model's own limits come first, then the machine's."""
    if not switched_on(SWITCH, ON_BY_DEFAULT):
        return f"it is switched off ({SWITCH}=0)"
    if len(model.segments) != 1:
        return "the model is split over several devices"
    if model.dtype not in (torch.bfloat16, torch.float16):
        return f"it streams bf16 or fp16 weights, not {model.dtype}"
    problem = shape_problem(model.config, programs)
    if problem is not None:
        return problem
    device = model.first_device
    if not use_triton(torch.empty(0, device=device)):
        return "the step does not run Triton kernels here (CPU, or LLAMA_TRITON_BACKEND=torch)"
    if torch.cuda.get_device_capability(device)[0] < 9:
        return "it needs TMA and warp specialisation: a Hopper or newer GPU"
    shared = shared_memory_per_block(device)
    if ring_stages(model.config, model.dtype.itemsize, shared, programs) < MIN_STAGES:
        return (f"its staged row and a ring of {MIN_STAGES} weight tiles do not fit in the "
                f"{shared // 1024} KB of shared memory a block may use here")
    return None


def shared_memory_per_block(device) -> int:
    """The shared memory one block may opt in to (227 KB on a Hopper SM, 99 KB on consumer
    Blackwell); torch versions before it was exposed get Hopper's."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", HOPPER_SHARED_BYTES)


def shape_problem(c, programs: int) -> str | None:
    """The tiling limits of the kernel, for a config and a grid of `programs`."""
    H, I, D = c.hidden_size, c.intermediate_size, c.head_dim
    nqkv = c.q_size + 2 * c.kv_size
    for name, n in (("hidden_size", H), ("intermediate_size", I), ("qkv rows", nqkv),
                    ("vocab_size", c.vocab_size)):
        if n % BLOCK_N:
            return f"{name}={n} is not a multiple of the {BLOCK_N}-row weight tile"
    for name, k in (("hidden_size", H), ("intermediate_size", I)):
        if k % BLOCK_K:
            return f"{name}={k} is not a multiple of the {BLOCK_K}-column weight tile"
    if c.q_size != H:
        return f"the query heads' width {c.q_size} is not hidden_size={H}"
    if D & (D - 1) or not 16 <= D <= 512:
        return f"head_dim={D} is not a power of two from 16 to 512"
    if writers_per_block(c.vocab_size, H, programs) > 2:
        # more than two fp32 atomics on one logit would not commute exactly
        return f"vocab_size={c.vocab_size} is too small for {programs} programs"
    return None


def stack_layers(model: LlamaModel, name: str) -> torch.Tensor:
    """All layers' `name` weights in one [layers * rows, ...] tensor; the layers get views."""
    parts = [layer[name] for layer in model.layers]
    stacked = torch.empty((len(parts) * parts[0].shape[0], *parts[0].shape[1:]),
                          dtype=parts[0].dtype, device=parts[0].device)
    rows = parts[0].shape[0]
    for i, layer in enumerate(model.layers):
        stacked[i * rows:(i + 1) * rows].copy_(layer[name])
        layer[name] = stacked[i * rows:(i + 1) * rows]   # the old tensor is freed here
    return stacked


def make_persistent_decode(model: LlamaModel, cache: PagedKVCache) -> "PersistentDecode | None":
    """The persistent step where it can run here, else None (the per-op kernels run). Where
    LLAMA_TRITON_PERSISTENT=1 asks for it and it cannot run, a warning says why."""
    programs, reason = _programs_or_reason(model)
    if reason is not None:
        if os.environ.get(SWITCH) == "1":
            warnings.warn(f"{SWITCH}=1, but the persistent decode step cannot run: {reason}; "
                          "decoding with the per-op kernels", stacklevel=2)
        return None
    from runtime.persistent_step import PersistentDecode
    return PersistentDecode(model, cache, programs)


def _programs_or_reason(model: LlamaModel) -> tuple[int, str | None]:
    if model.first_device.type != "cuda":
        return 0, f"the model is on {model.first_device.type}, not a CUDA GPU"
    if importlib.util.find_spec("triton.experimental.gluon") is None:
        return 0, "this triton is older than Gluon"
    programs = torch.cuda.get_device_properties(model.first_device).multi_processor_count
    return programs, why_not(model, programs)
