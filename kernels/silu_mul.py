"""SiLU(gate) * up over the output of the fused gate+up projection."""
import torch

from .dispatch import use_triton


def silu_mul_ref(x):
    i = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[:, :i]) * xf[:, i:]).to(x.dtype)


def silu_mul_triton(x):
    return silu_mul_ref(x)


def silu_mul(x):
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:], [T, I] in x.dtype."""
    if use_triton(x):
        return silu_mul_triton(x)
    return silu_mul_ref(x)
