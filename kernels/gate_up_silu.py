"""silu(x @ W_gate.T) * (x @ W_up.T) in one kernel, over the fused gate+up weight w13 [2I, K]
(rows 0..I-1 gate, I..2I-1 up). At decode (T <= 16 rows) the step is launch/latency-bound: one
GEMV whose programs each stream both weight tiles of their BLOCK_N columns and apply SiLU-and-
multiply in the epilogue saves a launch per layer and the [T, 2I] intermediate's write and
read, while reading the same weight bytes as the unfused GEMV. Prefill (compute-bound) keeps
the tiled GEMM followed by kernels.silu_mul."""
import torch
import triton
import triton.language as tl

from .dispatch import dot_precision, tune, use_triton
from .linear import DECODE_MAX_ROWS, linear_ref, linear_triton
from .pdl import pdl_args, pdl_release, pdl_wait
from .silu_mul import silu_mul_ref, silu_mul_triton

# (BLOCK_N, BLOCK_K, num_warps, num_stages): kernels.linear's decode list, with the tiles that
# two weight operands would push past the H100's 227 KB of shared memory in bf16 halved:
# 32x512 -> 32x256, 128x128 -> 128x64, 64x256 -> 64x128 (at 8 warps and 3 stages, since
# 64x128 at 4 warps and 4 stages is listed already). All need <= 160 KB by smem_bytes. fp32
# (exact-match runs only) needs twice that: the autotuner drops what overflows, as in linear.
DECODE_SHAPES = [(16, 256, 4, 4), (16, 512, 4, 3), (16, 128, 2, 4), (32, 256, 4, 4),
                 (32, 256, 8, 3), (64, 128, 4, 4), (64, 128, 8, 3), (128, 64, 4, 4)]


def smem_bytes(block_n, block_k, stages, elt=2):
    """Pipelined operand bytes of one program: the 16-row x tile and two weight tiles a stage."""
    return (16 + 2 * block_n) * block_k * elt * stages


def gate_up_silu_ref(x, w13):
    return silu_mul_ref(linear_ref(x, w13))


@triton.autotune(
    configs=tune([triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                  for n, k, w, s in DECODE_SHAPES],
                 triton.Config({"BLOCK_N": 16, "BLOCK_K": 32})),
    key=["M_BUCKET", "N", "K"],
)
@triton.jit
def _decode_gate_up_silu_kernel(x_ptr, w_ptr, out_ptr, M, N, K, M_BUCKET, sxm, swn, som,
                                DOT_PREC: tl.constexpr, PDL: tl.constexpr,
                                BLOCK_N: tl.constexpr,
                                BLOCK_K: tl.constexpr):
    rm = tl.arange(0, 16)  # rows padded to tl.dot's minimum
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    pdl_wait(PDL)
    gate_rows = w_ptr + rn[None, :].to(tl.int64) * swn
    up_rows = w_ptr + (N + rn[None, :]).to(tl.int64) * swn  # up row j is w13 row I + j
    g = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w_mask = (rn[None, :] < N) & (kk[:, None] < K)
        wg = tl.load(gate_rows + kk[:, None], mask=w_mask, other=0.0)
        wu = tl.load(up_rows + kk[:, None], mask=w_mask, other=0.0)
        g += tl.dot(x, wg, input_precision=DOT_PREC)
        u += tl.dot(x, wu, input_precision=DOT_PREC)
    pdl_release(PDL)
    y = g / (1.0 + tl.exp(-g)) * u  # from the fp32 accumulators: no rounding of g and u
    tl.store(out_ptr + rm[:, None] * som + rn[None, :], y.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def gate_up_silu_triton(x, w13):
    M, K = x.shape
    if M > DECODE_MAX_ROWS:
        # the Triton kernels themselves, not the public ops, so interpreter runs test them too
        return silu_mul_triton(linear_triton(x, w13))
    if x.stride(-1) != 1:
        x = x.contiguous()
    if w13.stride(-1) != 1:
        w13 = w13.contiguous()
    I = w13.shape[0] // 2
    out = torch.empty((M, I), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    grid = lambda meta: (triton.cdiv(I, meta["BLOCK_N"]),)
    _decode_gate_up_silu_kernel[grid](x, w13, out, M, I, K, triton.next_power_of_2(M),
                                      x.stride(0), w13.stride(0), out.stride(0),
                                      DOT_PREC=dot_precision(x.dtype),
                                      **pdl_args(x.device))
    return out


def gate_up_silu(x, w13):
    """x [T, K], w13 [2I, K] (gate rows then up rows) -> silu(gate) * up, [T, I] in x.dtype."""
    if use_triton(x):
        return gate_up_silu_triton(x, w13)
    return gate_up_silu_ref(x, w13)
