"""The one place that decides whether an op runs as a Triton kernel or as its PyTorch reference,
and the helpers every launcher shares."""
import functools
import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run Triton unless LLAMA_TRITON_BACKEND=torch asks for the reference (A/B
    checks). The variable is read on every call so a test or a user can flip it at run time."""
    return t.is_cuda and os.environ.get("LLAMA_TRITON_BACKEND", "triton") != "torch"


def switched_on(name: str, default: bool) -> bool:
    """An A/B switch read from the environment at every call: unset gives the default, "1" on,
    "0" off; anything else is a typo that would compare the wrong thing, so it fails loudly."""
    value = os.environ.get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r} is not one of '0', '1' (or unset)")
    return value == "1"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tune(configs, interpreter_config=None):
    """Autotune candidates; the interpreter has no driver to benchmark on, so it gets one."""
    if interpreting():
        return [interpreter_config or configs[0]]
    return configs


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 runs must match the CPU reference (greedy tokens equal): no TF32 rounding of operands.
    return "ieee" if dtype == torch.float32 else "tf32"


def sm_count(device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, so tests still exercise several splits
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    # cached: launchers run hundreds of times per token and host time is the decode bottleneck
    return torch.cuda.get_device_properties(index).multi_processor_count
