"""Warm L2 with the weights that the next GEMV of a decode step will stream.

At decode, between two GEMVs run kernels that barely touch DRAM (RMSNorm, attention over a short
context), and memory idles through them and the launch gaps around them: several microseconds a
layer. The weights the next GEMV reads depend on nothing computed this step, so such a kernel
can ask L2 for the start of them (`prefetch.global.L2`: one instruction per 128-byte line, no
register written, nothing waited for) and the GEMV then finds those lines in L2. Results cannot
change: a prefetch moves no data that a kernel sees. LLAMA_TRITON_PREFETCH=0 turns it off (A/B
runs); the interpreter has no inline assembly, so it is off there too."""
import functools
import os

import torch
import triton
import triton.language as tl

from .dispatch import interpreting, sm_count

LINE = 128  # bytes a prefetch instruction brings into L2
# L2 is 50 MB on the H100 and the H200: what one idle stretch can bring in at ~4 TB/s, and no
# more, so the prefetched lines are not evicted by each other before the GEMV reads them
MAX_BYTES = 16 << 20
LINES_PER_PROGRAM = 512  # a prefetch-only program's share: 64 KB, 4 instructions a thread


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 8


def prefetch_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or interpreting() or os.environ.get("LLAMA_TRITON_PREFETCH") == "0":
        return False
    return _device_supports(device.index if device.index is not None
                            else torch.cuda.current_device())


def prefetch_lines(weight: torch.Tensor | None) -> int:
    """How many 128-byte lines from the start of weight are worth asking for (0: none)."""
    if weight is None or not prefetch_enabled(weight.device):
        return 0
    return triton.cdiv(min(weight.numel() * weight.element_size(), MAX_BYTES), LINE)


def prefetch_programs(lines: int, device: torch.device) -> int:
    """Programs a kernel adds to prefetch `lines` on its own: one wave at most."""
    return min(sm_count(device), triton.cdiv(lines, LINES_PER_PROGRAM)) if lines else 0


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the line holding each address of `ptrs`; nothing comes back to registers.
    inline_asm_elementwise needs an output, hence the dummy register; is_pure=False keeps the
    unused op from being removed. GPU only: the interpreter has no inline asm."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_share(base, n_lines, program, programs, BLOCK: tl.constexpr = 256):
    """Prefetch this program's contiguous share of lines [0, n_lines) of base into L2."""
    per = tl.cdiv(n_lines, programs)
    lo = program * per
    hi = tl.minimum(lo + per, n_lines)
    byte_base = base.to(tl.pointer_type(tl.uint8), bitcast=True)
    for first in range(lo, hi, BLOCK):
        line = tl.minimum(first + tl.arange(0, BLOCK), hi - 1)  # repeats the last: no mask
        prefetch_l2(byte_base + line.to(tl.int64) * 128)
