"""RMSNorm fused with the residual add that precedes it in every Llama block."""
import torch

from .dispatch import use_triton


def rmsnorm_ref(x, weight, eps, residual=None):
    # Hugging Face's LlamaRMSNorm order: normalise in fp32, cast back, then scale by the weight.
    s = x + residual if residual is not None else x
    sf = s.float()
    out = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return out, s


def rmsnorm_triton(x, weight, eps, residual=None):
    return rmsnorm_ref(x, weight, eps, residual)


def rmsnorm(x, weight, eps, residual=None):
    """x [T, H]; returns (norm(x + residual) * weight, x + residual)."""
    if use_triton(x):
        return rmsnorm_triton(x, weight, eps, residual)
    return rmsnorm_ref(x, weight, eps, residual)
