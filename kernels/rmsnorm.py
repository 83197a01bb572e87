"""RMSNorm fused with the residual add that precedes it in every Llama block."""
import torch
import triton
import triton.language as tl

from .dispatch import tune, use_triton
from .linear import SplitPartials
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
def _rmsnorm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, s_ptr, H, sx, sr, so, ss, s_part, eps,
                    HAS_RES: tl.constexpr, N_PARTS: tl.constexpr, PDL: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    act = s_ptr.dtype.element_ty  # the activations' type (x's, or the partials' sum's)
    pdl_wait(PDL)
    if N_PARTS > 0:
        # a split-K GEMV's fp32 partials, summed in split order and cast as its last program
        # would have (kernels.linear.SplitPartials)
        total = tl.zeros((BLOCK,), tl.float32)
        for p in tl.static_range(N_PARTS):
            total += tl.load(x_ptr + p * s_part + row * sx + cols, mask=mask, other=0.0)
        x = total.to(act)
    else:
        x = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + row * sr + cols, mask=mask, other=0.0)
        # round the sum to x's dtype first, exactly like torch's `x + residual`
        x = (x.to(tl.float32) + r.to(tl.float32)).to(act)
    pdl_release(PDL)  # every load issued: the next kernel may launch (kernels.pdl)
    if HAS_RES:
        tl.store(s_ptr + row * ss + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)
    y = (xf * rstd).to(act).to(tl.float32)
    tl.store(out_ptr + row * so + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm_triton(x, weight, eps, residual=None):
    parts = x.parts if isinstance(x, SplitPartials) else None
    if parts is not None:
        # the sum's type comes from the buffer the kernel writes it to
        assert residual is not None and residual.dtype == x.dtype, "partials need a residual"
        x = parts[0]
    elif x.stride(-1) != 1:
        x = x.contiguous()
    T, H = x.shape
    act = residual.dtype if parts is not None else x.dtype
    out = torch.empty((T, H), device=x.device, dtype=torch.promote_types(act, weight.dtype))
    if residual is not None:
        residual = residual if residual.stride(-1) == 1 else residual.contiguous()
        s = torch.empty((T, H), device=x.device, dtype=act)
    else:
        residual, s = x, x  # unused by the kernel (HAS_RES=False)
    _rmsnorm_kernel[(T,)](x, residual, weight, out, s, H, x.stride(0), residual.stride(0),
                          out.stride(0), s.stride(0), 0 if parts is None else parts.stride(0),
                          eps, HAS_RES=residual is not x,
                          N_PARTS=0 if parts is None else parts.shape[0],
                          BLOCK=triton.next_power_of_2(H), **pdl_args(x.device))
    return out, s


def rmsnorm(x, weight, eps, residual=None):
    """x [T, H] (or a split-K GEMV's SplitPartials, with a residual); returns
    (norm(x + residual) * weight, x + residual)."""
    if isinstance(x, SplitPartials) or use_triton(x):
        return rmsnorm_triton(x, weight, eps, residual)
    return rmsnorm_ref(x, weight, eps, residual)
