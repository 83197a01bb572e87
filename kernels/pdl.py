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

Measured on an H200 (bench/RESULTS.md, 2026-12-02, session 5): the 1B decode step replays in
1.046 ms with it against 1.088 ms without, the 8B step in 4.61 against 4.74 ms, so it is on.
LLAMA_TRITON_PDL=0 turns it off (A/B runs); it is read at every launch, so a CUDA graph keeps
the setting it was captured with. PDL stays off under the interpreter, off the GPU, and below
compute capability 9."""
import functools

import torch
import triton
import triton.language as tl

from .dispatch import interpreting, switched_on


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    # cached: launchers run hundreds of times per token; triton < 3.4 has no gdc_* at all
    has_gdc = hasattr(tl.extra, "cuda") and hasattr(tl.extra.cuda, "gdc_wait")
    return has_gdc and torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether a launch on `device` can use PDL at all (the switch aside)."""
    if device.type != "cuda" or interpreting():
        return False
    return _device_supports(device.index if device.index is not None
                            else torch.cuda.current_device())


def pdl_args(device: torch.device) -> dict:
    """Launch keyword arguments of a kernel that calls pdl_wait / pdl_release: its PDL constexpr
    and, when on, launch_pdl=True."""
    if switched_on("LLAMA_TRITON_PDL", True) and pdl_enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait until the kernel before has finished and its writes are visible. Call it before the
    first store and before the first load of anything the kernel before may write. Loads of
    memory it does not write may come first: weights, and (decode attention) the step's graph
    inputs and cache rows of earlier steps. Those were written before it started, and it starts
    only after the kernel before it has passed its own wait, so by kernels already finished."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_release(PDL: tl.constexpr):
    """Let the next kernel launch once every program got here. Call it after the last load of
    the main loop and before the epilogue's stores, not earlier: programs of the next kernel
    placed sooner only wait, holding SM slots that this kernel's programs need."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
