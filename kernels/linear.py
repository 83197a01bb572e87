"""y = x @ W.T for every projection of the model.

Two kernels, because the two phases hit different limits:
- decode (T <= 16 rows): memory-bound; the weight is streamed once. Rows are padded to 16 for
  tl.dot, and small BLOCK_N tiles give enough programs to keep every SM loading (a 2048-row
  weight with BLOCK_N=16 is 128 programs) -- the GEMV-style alternative to split-K.
- prefill: compute-bound; tensor-core tiles with grouped ordering for L2 reuse.
Both are autotuned, keyed on (row-count bucket, N, K) so a new prompt length does not retune."""
import torch
import triton
import triton.language as tl

from .dispatch import dot_precision, tune, use_triton

DECODE_MAX_ROWS = 16


def linear_ref(x, weight):
    return torch.nn.functional.linear(x, weight)


def _decode_configs():
    shapes = [(16, 256, 4, 4), (16, 512, 4, 3), (16, 128, 2, 4), (32, 256, 4, 4),
              (32, 512, 8, 3), (64, 256, 4, 4), (64, 128, 4, 4), (128, 128, 4, 4)]
    return tune([triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                 for n, k, w, s in shapes], triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}))


def _prefill_configs():
    # Triton's Hopper matmul tutorial set, plus 64-wide K tiles for the long-K projections
    shapes = [(128, 256, 64, 8, 3), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4),
              (128, 128, 64, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
              (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
    return tune([triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                               num_warps=w, num_stages=s) for m, n, k, w, s in shapes],
                triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}))


@triton.autotune(configs=_decode_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _decode_linear_kernel(x_ptr, w_ptr, out_ptr, M, N, K, M_BUCKET, sxm, swn, som,
                          DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.arange(0, 16)  # rows padded to tl.dot's minimum
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :].to(tl.int64) * swn + kk[:, None],
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc += tl.dot(x, w, input_precision=DOT_PREC)
    tl.store(out_ptr + rm[:, None] * som + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.autotune(configs=_prefill_configs(), key=["M_BUCKET", "N", "K"])
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _prefill_linear_kernel(x_ptr, w_ptr, out_ptr, M, N, K, M_BUCKET, sxm, swn, som,
                           DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    # grouped ordering: GROUP_M row tiles sweep the same weight columns while they sit in L2
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * swn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # no K mask: lets loads vectorise and pipeline without predicates
            x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
            w = tl.load(w_ptrs, mask=rn[None, :] < N, other=0.0)
        else:
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
            w = tl.load(w_ptrs, mask=(rn[None, :] < N) & (rk[:, None] < K - k0), other=0.0)
        acc += tl.dot(x, w, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    tl.store(out_ptr + rm[:, None].to(tl.int64) * som + rn[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def linear_triton(x, weight):
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out
    args = (x, weight, out, M, N, K, triton.next_power_of_2(M), x.stride(0), weight.stride(0),
            out.stride(0))
    prec = dot_precision(x.dtype)
    if M <= DECODE_MAX_ROWS:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
        _decode_linear_kernel[grid](*args, DOT_PREC=prec)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
        _prefill_linear_kernel[grid](*args, DOT_PREC=prec)
    return out


def linear(x, weight):
    """x [T, K], weight [N, K] -> [T, N] in x.dtype."""
    if use_triton(x):
        return linear_triton(x, weight)
    return linear_ref(x, weight)
