"""Programmatic dependent launch (Hopper and newer): the decode step is a chain of small kernels,
and between two of them the GPU normally sits idle while the second is launched and its programs
are placed. Launched with launch_pdl, a kernel's programs may be placed while the kernel before
it still runs; each program first lets the next kernel launch (once every program of this one
has started), then waits until the kernel before it has finished and its writes are visible, and
only then touches memory. LLAMA_TRITON_PDL=0 turns it off (A/B runs)."""
import functools
import os

import torch
import triton
import triton.language as tl

from .dispatch import interpreting


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    has_gdc = hasattr(tl.extra, "cuda") and hasattr(tl.extra.cuda, "gdc_wait")
    return has_gdc and torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or interpreting() or os.environ.get("LLAMA_TRITON_PDL") == "0":
        return False
    return _device_supports(device.index if device.index is not None
                            else torch.cuda.current_device())


def pdl_args(device: torch.device) -> dict:
    """Keyword arguments for a launch of a kernel that starts with pdl_start(PDL)."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First statement of a kernel launched with pdl_args: nothing before it may read or write
    global memory that an earlier kernel writes or reads."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
