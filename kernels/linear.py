"""y = x @ W.T for every projection of the model.

Two paths, because the two phases hit different limits:
- decode (T <= 16 rows): memory-bound; the weight is streamed once. Rows are padded to 16 for
  tl.dot. A big N (w13, lm_head) gives every SM several programs over N alone. A split-K
  variant serves small N (wqkv, wo, w2; LLAMA_TRITON_SPLITK=0 turns it off, see NOTES.md):
  grid (cdiv(N, BLOCK_N), SPLIT_K), each program writes its fp32 partial to [SPLIT_K, M, N],
  and the last of a column block's programs to finish (kernels/arrival.py) sums the partials
  in split order and casts: deterministic, one launch, graph-safe. Or, for an output that only
  kernels.rmsnorm reads, the partials are left for it to sum (SplitPartials).
- prefill: compute-bound; tensor-core tiles with grouped ordering for L2 reuse.
All are autotuned, keyed on (row-count bucket, N, K[, SPLIT_K]) so a new prompt length does not
retune."""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .arrival import arrival_counters, is_last_arrival
from .dispatch import dot_precision, sm_count, switched_on, tune, use_triton
from .pdl import pdl_args, pdl_release, pdl_wait

DECODE_MAX_ROWS = 16


def linear_ref(x, weight):
    if weight.dim() == 3:
        return _linear_parts(x, weight)
    return torch.nn.functional.linear(x, weight)


def cpu_layout(weight: torch.Tensor, parts: int | None = None) -> torch.Tensor:
    """[N, K] -> [parts, K, N / parts]: the output rows cut into `parts` chunks (by default one
    per thread, as many as divide N), each stored K-major. Measured on 2 cores (bench/RESULTS.md,
    2026-11-25): MKL runs a one-row GEMV on one core (17-27 GB/s), while a bmm over the chunks
    runs one chunk per core (30-45 GB/s)."""
    n, k = weight.shape
    parts = parts or cpu_parts(n)
    return weight.reshape(parts, n // parts, k).transpose(1, 2).contiguous()


def cpu_parts(rows: int) -> int:
    parts = torch.get_num_threads()
    while rows % parts:
        parts -= 1
    return parts


def _linear_parts(x, weight):
    parts, k, n = weight.shape
    out = torch.bmm(x.expand(parts, *x.shape), weight)   # [parts, T, n]
    return out.transpose(0, 1).reshape(x.shape[0], parts * n)


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


def _split_configs():
    # every BLOCK_K divides SPLIT_UNIT, so each split's K chunk is whole tiles
    shapes = [(16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4), (64, 64, 4, 4),
              (32, 64, 4, 4), (128, 128, 4, 3), (64, 128, 8, 3), (16, 64, 2, 4)]
    return tune([triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                 for n, k, w, s in shapes], triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}))


_SPLIT_CONFIGS = _split_configs()
SPLIT_UNIT = max(c.kwargs["BLOCK_K"] for c in _SPLIT_CONFIGS)  # 128 on GPU, 32 interpreted
SPLIT_BLOCK_N = 64  # nominal tile width for counting programs over N
SPLIT_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _SPLIT_CONFIGS)  # most column blocks
# On: with the sum done by each column block's last program (no reduce launch), an H200 1B step
# replays in 1.016 ms against 1.056 ms unsplit, the 8B step in 4.51 against 4.49 (NOTES.md,
# 2026-12-02). With a separate reduce kernel it had lost on the H100. LLAMA_TRITON_SPLITK=0
# turns it off (A/B runs).
DECODE_SPLIT_K = True


def decode_split_k(N, K, sms):
    """(SPLIT_K, K per split) for a decode GEMV: 1 while N alone gives every SM a program at
    BLOCK_N=64 (the unsplit kernel then has 2-8x SMs programs at BLOCK_N 32-16); otherwise
    enough K splits for ~2x SMs programs, each split a whole number of SPLIT_UNIT columns."""
    tiles = triton.cdiv(N, SPLIT_BLOCK_N)
    if tiles >= sms or K <= SPLIT_UNIT:
        return 1, K
    split = min(triton.cdiv(2 * sms, tiles), triton.cdiv(K, SPLIT_UNIT))
    return _round_split(split, K)


def _round_split(split, K):
    per = triton.cdiv(triton.cdiv(K, max(split, 1)), SPLIT_UNIT) * SPLIT_UNIT
    return triton.cdiv(K, per), per  # no empty split: every partial row gets written


@triton.autotune(configs=_decode_configs(), key=["M_BUCKET", "N", "K"])
@triton.jit
def _decode_linear_kernel(x_ptr, w_ptr, out_ptr, M, N, K, M_BUCKET, sxm, swn, som,
                          DOT_PREC: tl.constexpr, PDL: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.arange(0, 16)  # rows padded to tl.dot's minimum
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    pdl_wait(PDL)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :],
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :].to(tl.int64) * swn + kk[:, None],
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc += tl.dot(x, w, input_precision=DOT_PREC)
    pdl_release(PDL)
    tl.store(out_ptr + rm[:, None] * som + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.autotune(configs=_SPLIT_CONFIGS, key=["M_BUCKET", "N", "K", "SPLIT_K"])
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _decode_splitk_kernel(x_ptr, w_ptr, part_ptr, out_ptr, counter_ptr, M, N, K, M_BUCKET,
                          SPLIT_K, K_PER_SPLIT, sxm, swn, som, DOT_PREC: tl.constexpr,
                          PDL: tl.constexpr, SUM: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    pdl_wait(PDL)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, 16)  # rows padded to tl.dot's minimum
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_PER_SPLIT  # K_PER_SPLIT is a multiple of BLOCK_K: only K itself is ragged
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    x_ptrs = x_ptr + rm[:, None] * sxm + (k_lo + rk)[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * swn + (k_lo + rk)[:, None]
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
            w = tl.load(w_ptrs, mask=rn[None, :] < N, other=0.0)
        else:
            x = tl.load(x_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
            w = tl.load(w_ptrs, mask=(rn[None, :] < N) & (rk[:, None] < K - k0), other=0.0)
        acc += tl.dot(x, w, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    pdl_release(PDL)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    parts = part_ptr + rm[:, None] * N + rn[None, :]  # split s's partial is s * M * N further
    tl.store(parts + pid_k * M * N, acc, mask=mask)
    if SUM:  # else the kernel that reads the output sums the partials (SplitPartials)
        if is_last_arrival(counter_ptr + tl.program_id(0), SPLIT_K):
            total = tl.zeros((16, BLOCK_N), dtype=tl.float32)
            for s in range(0, SPLIT_K):  # split order: the same sum whichever program is last
                # .cg reads L2: other SMs wrote these, and this SM's L1 may hold an older call's
                total += tl.load(parts + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + rm[:, None] * som + rn[None, :],
                     total.to(out_ptr.dtype.element_ty), mask=mask)


class SplitPartials(NamedTuple):
    """A split-K decode GEMV's output left unsummed: its fp32 partial products [SPLIT_K, M, N],
    which the kernel that reads them (kernels.rmsnorm) sums in split order and casts to dtype,
    exactly as the GEMV's last program would have. That program's tail (an atomic, the reads
    of every partial, the store) then leaves the GEMV, whose next kernel waits for it."""
    parts: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.parts.shape[1:]

    @property
    def device(self) -> torch.device:
        return self.parts.device


def _launch_decode(x, weight, out, split, k_per_split, sum_later=False):
    """out = x @ weight.T; with sum_later and split > 1, returns the SplitPartials instead."""
    M, K = x.shape
    N = weight.shape[0]
    prec = dot_precision(x.dtype)
    m_bucket = triton.next_power_of_2(M)
    if split == 1:
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)
        _decode_linear_kernel[grid](x, weight, out, M, N, K, m_bucket, x.stride(0),
                                    weight.stride(0), out.stride(0), DOT_PREC=prec,
                                    **pdl_args(x.device))
        return out
    part = torch.empty((split, M, N), device=x.device, dtype=torch.float32)
    counters = arrival_counters(x.device, triton.cdiv(N, SPLIT_MIN_BLOCK_N))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), split)
    _decode_splitk_kernel[grid](x, weight, part, out, counters, M, N, K, m_bucket, split,
                                k_per_split, x.stride(0), weight.stride(0), out.stride(0),
                                DOT_PREC=prec, SUM=not sum_later, **pdl_args(x.device))
    return SplitPartials(part, out.dtype) if sum_later else out


def _fp32_prefill_prune(configs, named_args, **kwargs):
    """fp32 (exact-match runs only) gets the mid-size tiles: the big ones overflow shared
    memory or take ~10 s each to compile as FMA loops, and the autotuner compiles them all."""
    if named_args["x_ptr"].element_size() < 4:
        return configs
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 128
             and c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * 4
             * c.num_stages <= 160 * 1024]
    return small or configs[-1:]


@triton.autotune(configs=_prefill_configs(), key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _fp32_prefill_prune})
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


def linear_triton(x, weight, out_dtype=None, sum_later=False):
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    M, K = x.shape
    N = weight.shape[0]
    # the kernels cast their fp32 accumulators on store: a float32 output costs no extra pass
    out = torch.empty((M, N), device=x.device, dtype=out_dtype or x.dtype)
    if M == 0:
        return out
    if M <= DECODE_MAX_ROWS:
        split_on = switched_on("LLAMA_TRITON_SPLITK", DECODE_SPLIT_K)
        split = decode_split_k(N, K, sm_count(x.device)) if split_on else (1, K)
        return _launch_decode(x, weight, out, *split, sum_later=sum_later)
    args = (x, weight, out, M, N, K, triton.next_power_of_2(M), x.stride(0), weight.stride(0),
            out.stride(0))
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _prefill_linear_kernel[grid](*args, DOT_PREC=dot_precision(x.dtype))
    return out


def linear(x, weight, out_dtype=None, sum_later=False):
    """x [T, K], weight [N, K] -> [T, N] in out_dtype (by default x.dtype). sum_later: the
    caller hands the result to kernels.rmsnorm, so a split-K decode GEMV may return its
    SplitPartials (on since the engine's GPU tests passed with it; LLAMA_TRITON_SUM_LATER=0
    turns it off, for A/B runs; NOTES.md)."""
    if use_triton(x):
        sum_later = sum_later and switched_on("LLAMA_TRITON_SUM_LATER", True)
        return linear_triton(x, weight, out_dtype, sum_later)
    out = linear_ref(x, weight)
    return out if out_dtype is None else out.to(out_dtype)
