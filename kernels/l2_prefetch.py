"""Bulk L2 prefetch of the weights the next GEMV of a decode step streams (sm_90 and newer).

Between two GEMVs a decode step runs kernels that barely touch DRAM (RMSNorm, attention over a
short context), and each GEMV pays a ramp before its first weight bytes arrive: DRAM idles for
several microseconds a layer. The weights depend on nothing computed in the step, so a kernel
can ask L2 for the next GEMV's weights before it waits for the kernel before it (kernels.pdl):
- the decode attention asks for wo;
- RMSNorm asks for the weight of the GEMV that reads its output (wqkv, gate+up, the head), from
  programs added to its grid for that;
- the gate+up GEMV's programs, once their last weight load is issued, ask for w2.

Session 5 (kernels/NOTES.md) lost with `prefetch.global.L2`: one instruction per 128-byte line,
which kept the issuing kernels busy for as long as the GEMV saved. Here one instruction,
`cp.async.bulk.prefetch.L2.global`, asks the copy engine for CHUNK bytes and nothing waits for
it. A prefetch moves no data that a kernel sees, so no result can change.

LLAMA_TRITON_L2_PREFETCH_MB (0 by default: off) caps the bytes asked for per weight;
LLAMA_TRITON_L2_PREFETCH_SITES picks which of the three kinds of kernel ask (all by default).
Off under the interpreter (no inline assembly), off the GPU and below compute capability 9."""
import functools
import os

import torch
import triton
import triton.language as tl

from .dispatch import interpreting, sm_count

CHUNK = 16384  # bytes one prefetch instruction asks for
ISSUERS = 32  # threads of a program that ask: warp 0's, one chunk each a round
CHUNKS_PER_EXTRA_PROGRAM = 64  # a prefetch-only program's share: 1 MB, two rounds of warp 0
SITES = ("attention", "norm", "gate_up")
_ISSUERS = tl.constexpr(ISSUERS)


def prefetch_cap_bytes() -> int:
    value = os.environ.get("LLAMA_TRITON_L2_PREFETCH_MB", "0")
    if not value.isdigit():
        raise ValueError(f"LLAMA_TRITON_L2_PREFETCH_MB={value!r} is not a whole number of MB")
    return int(value) << 20


def prefetch_sites() -> set[str]:
    value = os.environ.get("LLAMA_TRITON_L2_PREFETCH_SITES", ",".join(SITES))
    sites = {s for s in value.split(",") if s}
    unknown = sites - set(SITES)
    if unknown:
        raise ValueError(f"LLAMA_TRITON_L2_PREFETCH_SITES={value!r}: {sorted(unknown)} is not "
                         f"among {', '.join(SITES)}")
    return sites


@functools.lru_cache(maxsize=None)
def _device_supports(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def prefetch_chunks(weight: torch.Tensor | None, site: str) -> int:
    """How many CHUNK-byte pieces from the start of weight the kernel at `site` asks L2 for
    (0: none). Only whole chunks inside the tensor: the copy engine faults past its end."""
    if weight is None or weight.device.type != "cuda" or interpreting():
        return 0
    cap = prefetch_cap_bytes()
    if cap == 0 or site not in prefetch_sites() or weight.data_ptr() % 16:
        return 0
    index = weight.device.index if weight.device.index is not None else torch.cuda.current_device()
    if not _device_supports(index):
        return 0
    return min(weight.numel() * weight.element_size(), cap) // CHUNK


def extra_programs(chunks: int, device: torch.device) -> int:
    """Programs a kernel with few of its own (RMSNorm at decode) adds to ask for `chunks`."""
    return min(sm_count(device), triton.cdiv(chunks, CHUNKS_PER_EXTRA_PROGRAM)) if chunks else 0


# Warp 0's thread t asks for chunk $2 + t if that is below $3 ($1: the weight's address).
_ROUND_ASM = tl.constexpr(
    "{\n\t.reg .u32 tid, t;\n\t.reg .u64 a;\n\t.reg .pred p;\n\t"
    "mov.u32 tid, %tid.x;\n\tadd.u32 t, tid, $2;\n\t"
    f"setp.lt.u32 p, tid, {ISSUERS};\n\tsetp.lt.and.u32 p, t, $3, p;\n\t"
    f"mul.wide.u32 a, t, {CHUNK};\n\tadd.u64 a, a, $1;\n\t"
    f"@p cp.async.bulk.prefetch.L2.global [a], {CHUNK};\n\t}}\n\tmov.u32 $0, 0;")


@triton.jit
def _prefetch_round(base, first, end):
    """Ask for chunks first .. min(first + ISSUERS, end) - 1 of base."""
    tl.inline_asm_elementwise(_ROUND_ASM, "=r,l,r,r", [base, first, end], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_share(base, n_chunks, program, programs):
    """Ask L2 for this program's contiguous share of chunks [0, n_chunks) of base."""
    per = tl.cdiv(n_chunks, programs)
    lo = program * per
    hi = tl.minimum(lo + per, n_chunks)
    for first in range(lo, hi, _ISSUERS):
        _prefetch_round(base, first, hi)
