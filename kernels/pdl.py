"""Programmatic dependent launch (PDL, compute capability 9 and newer) for the decode-path kernels.

A decode step is a CUDA graph of ~130 small dependent kernels, and between two of them the GPU
idles ~1.5 us while the second launches. A kernel launched with launch_pdl may be placed while
the kernel before it still runs, as soon as every program of that kernel has called
gdc_launch_dependents (or finished). Each such kernel calls two helpers:
- pdl_wait(PDL) before its first read of global memory that another kernel writes, and before
  its first global write (the kernel before may still read what it overwrites). Every program
  must call it: a PDL kernel that never waits is not ordered after its predecessor at all.
- pdl_release(PDL) once its main loop has issued its last weight/KV load, before the epilogue.

The first try (f5cf4a7, reverted) released at each kernel's start: a chain of next kernels then
launched early and their waiting programs took SM slots from the running GEMVs (H200, 1B step
1.112 -> 1.507 ms). Released late, only the next kernel is placed early, and only once this one
has nothing left to load.

LLAMA_TRITON_PDL picks the mode; it is read at every launch (a CUDA graph keeps the mode it was
captured with):
- unset or "0": off, the default (PDL has only lost so far);
- "1": late release;
- "prefetch": late release, and the decode GEMVs also prefetch the start of their weight strip
  into L2 before pdl_wait: weights are never written by an earlier kernel, so they may stream
  while the kernel before finishes.
PDL stays off under the interpreter, off the GPU, and below compute capability 9."""
import functools
import os

import torch
import triton
import triton.language as tl

from .dispatch import interpreting
from .prefetch import prefetch_l2

MODES = {"0": (False, False), "1": (True, False), "prefetch": (True, True)}  # (PDL, PREFETCH)
PREFETCH_BYTES = tl.constexpr(32 * 1024)  # per weight matrix and program, before pdl_wait
LINE_BYTES = tl.constexpr(128)  # one prefetch per L2 line


def pdl_mode() -> tuple[bool, bool]:
    """(PDL, PREFETCH) that LLAMA_TRITON_PDL asks for; a typo fails loudly rather than running
    an A/B comparison against the wrong mode."""
    value = os.environ.get("LLAMA_TRITON_PDL") or "0"
    if value not in MODES:
        allowed = ", ".join(repr(m) for m in MODES)
        raise ValueError(f"LLAMA_TRITON_PDL={value!r} is not one of {allowed} (or unset)")
    return MODES[value]


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    # cached: launchers run hundreds of times per token; triton < 3.4 has no gdc_* at all
    has_gdc = hasattr(tl.extra, "cuda") and hasattr(tl.extra.cuda, "gdc_wait")
    return has_gdc and torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether a launch on `device` can use PDL at all (the mode aside)."""
    if device.type != "cuda" or interpreting():
        return False
    return _device_supports(device.index if device.index is not None
                            else torch.cuda.current_device())


def pdl_args(device: torch.device, prefetch: bool = False) -> dict:
    """Launch keyword arguments of a kernel that calls pdl_wait / pdl_release: its PDL constexpr
    and, when on, launch_pdl=True. prefetch=True for a kernel that also takes a PREFETCH
    constexpr (the decode GEMVs); it is True only in the "prefetch" mode."""
    use_pdl, use_prefetch = pdl_mode()
    if not (use_pdl and pdl_enabled(device)):
        return {"PDL": False, "PREFETCH": False} if prefetch else {"PDL": False}
    args = {"PDL": True, "launch_pdl": True}
    if prefetch:
        args["PREFETCH"] = use_prefetch
    return args


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the kernel before has finished and its writes are visible. Call it before the
    first load of anything another kernel writes and before the first store; only loads of
    memory no kernel writes (weights, the prefetch below) may come before it."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel launch once every program got here. Call it after the last load of
    the main loop and before the epilogue's stores, not earlier: programs of the next kernel
    placed sooner only wait, holding SM slots that this kernel's programs need."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_strip(w_ptr, rows, last_row, K, swn, BLOCK_N: tl.constexpr):
    """Prefetch the first PREFETCH_BYTES that a GEMV program streams from one weight matrix:
    the leading columns (at most K) of its BLOCK_N rows `rows`, one address per 128-byte line.
    A prefetch has no mask, so rows past last_row and columns past K are clamped onto the last
    valid ones (a repeated line costs nothing)."""
    LINES: tl.constexpr = PREFETCH_BYTES // (BLOCK_N * LINE_BYTES)
    tl.static_assert(LINES >= 1, "BLOCK_N rows of one line each exceed PREFETCH_BYTES")
    PER_LINE: tl.constexpr = LINE_BYTES // (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
    r = tl.minimum(rows, last_row).to(tl.int64)
    cols = tl.minimum(tl.arange(0, LINES) * PER_LINE, K - 1)
    prefetch_l2(w_ptr + r[:, None] * swn + cols[None, :])
