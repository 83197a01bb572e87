"""SiLU(gate) * up over the output of the fused gate+up projection."""
import torch
import triton
import triton.language as tl

from .dispatch import tune, use_triton


def silu_mul_ref(x):
    i = x.shape[-1] // 2
    xf = x.float()
    return (torch.nn.functional.silu(xf[:, :i]) * xf[:, i:]).to(x.dtype)


@triton.autotune(
    configs=tune([triton.Config({"BLOCK": b}, num_warps=w) for b, w in
                  ((1024, 4), (2048, 4), (4096, 8))], triton.Config({"BLOCK": 64})),
    key=["I"],
)
@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, sx, so, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(x_ptr + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * sx + I + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * so + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul_triton(x):
    if x.stride(-1) != 1:
        x = x.contiguous()
    T, I = x.shape[0], x.shape[1] // 2
    out = torch.empty((T, I), device=x.device, dtype=x.dtype)
    grid = lambda meta: (T, triton.cdiv(I, meta["BLOCK"]))
    _silu_mul_kernel[grid](x, out, I, x.stride(0), out.stride(0))
    return out


def silu_mul(x):
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:], [T, I] in x.dtype."""
    if use_triton(x):
        return silu_mul_triton(x)
    return silu_mul_ref(x)
