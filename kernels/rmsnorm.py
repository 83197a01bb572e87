"""RMSNorm fused with the residual add that precedes it in every Llama block."""
import torch
import triton
import triton.language as tl

from .dispatch import tune, use_triton
from .pdl import pdl_args, pdl_release, pdl_wait


def rmsnorm_ref(x, weight, eps, residual=None):
    # Hugging Face's LlamaRMSNorm order: normalise in fp32, cast back, then scale by the weight.
    s = x + residual if residual is not None else x
    sf = s.float()
    out = (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight
    return out, s


@triton.autotune(
    configs=tune([triton.Config({}, num_warps=w) for w in (2, 4, 8, 16)]),
    key=["BLOCK"],
)
@triton.jit
def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, s_ptr, H, sx, sr, so, ss, eps,
                    HAS_RES: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + row * sr + cols, mask=mask, other=0.0)
        # round the sum to x's dtype first, exactly like torch's `x + residual`
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
    pdl_release(PDL)  # every load issued: the next kernel may launch (kernels.pdl)
    if HAS_RES:
        tl.store(s_ptr + row * ss + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    y = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * so + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm_triton(x, weight, eps, residual=None):
    if x.stride(-1) != 1:
        x = x.contiguous()
    T, H = x.shape
    out = torch.empty((T, H), device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
    if residual is not None:
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        s = torch.empty_like(x)
    else:
        residual, s = x, x  # unused by the kernel (HAS_RES=False)
    _rmsnorm_kernel[(T,)](x, residual, weight, out, s, H, x.stride(0), residual.stride(0),
                          out.stride(0), s.stride(0), eps, HAS_RES=residual is not x,
                          BLOCK=triton.next_power_of_2(H), **pdl_args(x.device))
    return out, s


def rmsnorm(x, weight, eps, residual=None):
    """x [T, H]; returns (norm(x + residual) * weight, x + residual)."""
    if use_triton(x):
        return rmsnorm_triton(x, weight, eps, residual)
    return rmsnorm_ref(x, weight, eps, residual)
