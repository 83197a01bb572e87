"""The one place that decides whether an op runs as a Triton kernel or as its PyTorch reference."""
import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """CUDA tensors run Triton unless LLAMA_TRITON_BACKEND=torch asks for the reference (A/B
    checks). The variable is read on every call so a test or a user can flip it at run time."""
    return t.is_cuda and os.environ.get("LLAMA_TRITON_BACKEND", "triton") != "torch"


def interpreting() -> bool:
    """Under TRITON_INTERPRET=1 autotune cannot benchmark (no driver): offer one config."""
    return os.environ.get("TRITON_INTERPRET") == "1"
