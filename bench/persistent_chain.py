"""The decode block's four weight streams (wqkv, wo, gate+up, w2) for every layer in ONE
persistent, warp-specialised launch, timed beside the engine's own kernels on the same chain.

This measures the design kernels/NOTES.md names as the one left to close the decode gap: the
next operation's weight tiles already in shared memory while its input is still being made.
Each program (one per SM) runs two partitions:
- a loader warp walks every weight tile the program owns, op after op and layer after layer,
  through a ring of shared-memory slots filled by TMA. It never waits on data, only on a free
  slot, so DRAM keeps streaming across op boundaries;
- the compute warps wait on a grid-wide counter until the op's input is complete, copy the whole
  input row into shared memory (applying SiLU-and-multiply for w2), multiply each tile as it
  lands, and add each row block's partial sum into the fp32 output with an atomic.

An op's tiles are (row block, K chunk) units in row-major order, split into equal contiguous
ranges, so the programs' shares differ by one tile at most. A row block is summed by at most a
few programs, whose fp32 atomics may land in any order: the result can differ from run to run in
the last bits, which is why this is a benchmark and not yet the decode step.

Stand-ins, as this is the weight chain alone: wo reads the first H outputs of wqkv in place of
attention's output; there is no RMSNorm, residual, rotary or attention.
usage: python -m bench.persistent_chain --shapes 1b 8b"""
from __future__ import annotations

import argparse
import math

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from bench.gemm_vs_cublas import device_us
from bench.shapes import SHAPES
from kernels.gate_up_silu import gate_up_silu
from kernels.linear import linear
# Gluon renamed these between triton 3.6 and 3.9; the engine's persistent step holds the shims
from kernels.persistent_decode import NEW_SMEM_API as _NEW_SMEM_API
from kernels.persistent_decode import cta_barrier as _cta_barrier
from kernels.persistent_decode import gemv, load_op, release, shared_buffers, wait_count

X_ROWS_PER_LOAD = 16  # K chunks of the input row copied into shared memory per load


@gluon.jit
def _loader(wqkv_desc, wo_desc, w13_desc, w2_desc, bufs, ready, empty, L, P: gl.constexpr,
            H: gl.constexpr, NQKV: gl.constexpr, I: gl.constexpr, BN: gl.constexpr,
            BK: gl.constexpr, STAGES: gl.constexpr):
    pid = gl.program_id(0)
    it = 0
    for layer in range(L):  # the ring's every slot may be in flight (IN_FLIGHT = STAGES)
        it = load_op(wqkv_desc, layer * NQKV, bufs, ready, empty, it, pid, P, NQKV, H, BN, BK,
                      STAGES, STAGES)
        it = load_op(wo_desc, layer * H, bufs, ready, empty, it, pid, P, H, H, BN, BK, STAGES,
                     STAGES)
        it = load_op(w13_desc, layer * 2 * I, bufs, ready, empty, it, pid, P, 2 * I, H, BN, BK,
                      STAGES, STAGES)
        it = load_op(w2_desc, layer * H, bufs, ready, empty, it, pid, P, H, I, BN, BK, STAGES,
                     STAGES)


@gluon.jit
def _stage_input(in_ptr, x_smem, K: gl.constexpr, BK: gl.constexpr, SILU_OFF: gl.constexpr,
                 ROWS: gl.constexpr, XL: gl.constexpr):
    # the op's input row into shared memory as [K // BK, BK] fp32; for w2 the row is
    # silu(gate) * up, gate at in_ptr and up SILU_OFF elements further
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, XL))
    cols = gl.arange(0, BK, layout=gl.SliceLayout(0, XL))
    offs = rows[:, None] * BK + cols[None, :]
    for c in gl.static_range(K // BK // ROWS):
        v = gl.load(in_ptr + c * ROWS * BK + offs)
        if SILU_OFF > 0:
            up = gl.load(in_ptr + SILU_OFF + c * ROWS * BK + offs)
            v = v / (1.0 + gl.exp(-v)) * up
        x_smem.slice(c * ROWS, ROWS).store(v)
    _cta_barrier()


@gluon.jit
def _compute_op(in_ptr, out_ptr, counter_ptr, wait_target, x_smem, bufs, ready, empty, it, pid,
                P: gl.constexpr, N: gl.constexpr, K: gl.constexpr, BN: gl.constexpr,
                BK: gl.constexpr, STAGES: gl.constexpr, SILU_OFF: gl.constexpr, ROWS: gl.constexpr,
                TL: gl.constexpr, XL: gl.constexpr):
    wait_count(counter_ptr, wait_target)
    _stage_input(in_ptr, x_smem, K, BK, SILU_OFF, ROWS, XL)
    # the same bytes seen as rows of BK, so that a tile's slice of x is one dynamic index
    ROW_LAYOUT: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    if _NEW_SMEM_API:
        x_rows = x_smem.reinterpret(gl.float32, x_smem.shape, ROW_LAYOUT)
    else:
        x_rows = x_smem._reinterpret(gl.float32, x_smem.shape, ROW_LAYOUT)
    it = gemv(out_ptr, x_rows, bufs, ready, empty, it, pid, P, N, K, BN, BK, STAGES, True, TL,
              K // BK)
    release(counter_ptr)
    return it


@gluon.jit
def _compute(x0_ptr, qkv_ptr, o_ptr, gu_ptr, y_ptr, counter_ptr, x_smem, bufs, ready, empty, L,
             P: gl.constexpr, H: gl.constexpr, NQKV: gl.constexpr, I: gl.constexpr,
             BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, ROWS: gl.constexpr,
             TL: gl.constexpr, XL: gl.constexpr):
    pid = gl.program_id(0)
    it = 0
    for layer in range(L):
        op = 4 * layer  # op j may start once all P programs have finished op j - 1
        if layer == 0:
            src = x0_ptr
        else:
            src = y_ptr + (layer - 1) * H
        qkv = qkv_ptr + layer * NQKV
        it = _compute_op(src, qkv, counter_ptr, P * op, x_smem, bufs, ready, empty, it, pid, P,
                         NQKV, H, BN, BK, STAGES, 0, ROWS, TL, XL)
        it = _compute_op(qkv, o_ptr + layer * H, counter_ptr, P * (op + 1), x_smem, bufs, ready,
                         empty, it, pid, P, H, H, BN, BK, STAGES, 0, ROWS, TL, XL)
        it = _compute_op(o_ptr + layer * H, gu_ptr + layer * 2 * I, counter_ptr, P * (op + 2),
                         x_smem, bufs, ready, empty, it, pid, P, 2 * I, H, BN, BK, STAGES, 0,
                         ROWS, TL, XL)
        it = _compute_op(gu_ptr + layer * 2 * I, y_ptr + layer * H, counter_ptr, P * (op + 3),
                         x_smem, bufs, ready, empty, it, pid, P, H, I, BN, BK, STAGES, I, ROWS,
                         TL, XL)


@gluon.jit
def persistent_chain_kernel(wqkv_desc, wo_desc, w13_desc, w2_desc, x0_ptr, qkv_ptr, o_ptr,
                            gu_ptr, y_ptr, counter_ptr, L, P: gl.constexpr, H: gl.constexpr,
                            NQKV: gl.constexpr,
                            I: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                            STAGES: gl.constexpr, ROWS: gl.constexpr, X_CHUNKS: gl.constexpr,
                            num_warps: gl.constexpr):
    # 16-byte vectors along K: a warp reads two full 256-byte tile rows, free of bank conflicts
    TL: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
    XL: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])
    bufs, ready, empty, x_smem = shared_buffers(wqkv_desc, STAGES, BN, BK, X_CHUNKS, gl.float32)
    gl.warp_specialize([
        (_compute, (x0_ptr, qkv_ptr, o_ptr, gu_ptr, y_ptr, counter_ptr, x_smem, bufs, ready,
                    empty, L, P, H, NQKV, I, BN, BK, STAGES, ROWS, TL, XL)),
        (_loader, (wqkv_desc, wo_desc, w13_desc, w2_desc, bufs, ready, empty, L, P, H, NQKV, I,
                   BN, BK, STAGES)),
    ], [1], [40])


class PersistentChain:
    """Stacked weights of `layers` blocks ([layers * N, K] each, as a decode step streams them)
    and the fp32 buffers one launch fills: qkv, o, gu and y, one row per layer."""

    def __init__(self, wqkv, wo, w13, w2, layers, block_n=64, block_k=128, stages=8,
                 num_warps=8):
        H, I = wqkv.shape[1], w2.shape[1]
        check_shapes(wqkv, wo, w13, w2, layers, block_n, block_k)
        self.layers, self.H, self.I, self.NQKV = layers, H, I, wqkv.shape[0] // layers
        self.meta = dict(BN=block_n, BK=block_k, STAGES=stages, ROWS=X_ROWS_PER_LOAD,
                         X_CHUNKS=triton.next_power_of_2(max(H, I) // block_k),
                         num_warps=num_warps)
        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=wo.element_size() * 8,
                                      rank=2)
        self.descs = [TensorDescriptor.from_tensor(w, [block_n, block_k], layout)
                      for w in (wqkv, wo, w13, w2)]
        widths = (self.NQKV, H, 2 * I, H)
        # one zeroing clears the outputs and, in the last element, the op counter
        self.flat = torch.zeros(layers * sum(widths) + 1, dtype=torch.float32, device=wo.device)
        parts = torch.split(self.flat[:-1], [layers * w for w in widths])
        self.qkv, self.o, self.gu, self.y = (p.view(layers, -1) for p in parts)
        self.counter = self.flat[-1:].view(torch.int32)
        self.grid = (torch.cuda.get_device_properties(wo.device).multi_processor_count,)

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        """x0: the first layer's input row, fp32 [H]. Returns the last layer's output row."""
        self.flat.zero_()
        persistent_chain_kernel[self.grid](*self.descs, x0, self.qkv, self.o, self.gu, self.y,
                                           self.counter, self.layers, self.grid[0], self.H,
                                           self.NQKV, self.I, **self.meta)
        return self.y[-1]


def check_shapes(wqkv, wo, w13, w2, layers, block_n, block_k):
    """The kernel's tiling limits, as errors that say which weight breaks which."""
    H, I = wqkv.shape[1], w2.shape[1]
    want = {"wqkv": (None, H), "wo": (layers * H, H), "w13": (layers * 2 * I, H),
            "w2": (layers * H, I)}
    for name, w in zip(want, (wqkv, wo, w13, w2)):
        rows, cols = want[name]
        if w.dim() != 2 or w.shape[1] != cols or (rows is not None and w.shape[0] != rows):
            raise ValueError(f"{name} is {tuple(w.shape)}; with H={H}, I={I} and {layers} "
                             f"layers it must be [{rows or 'layers * NQKV'}, {cols}]")
        if w.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"{name} is {w.dtype}; the chain streams bf16 or fp16 weights")
        if w.shape[0] % (layers * block_n):
            raise ValueError(f"{name} has {w.shape[0] // layers} rows a layer, not a multiple "
                             f"of block_n={block_n}")
    if wqkv.shape[0] < layers * H:
        raise ValueError(f"wqkv has {wqkv.shape[0] // layers} rows a layer; wo reads the first "
                         f"H={H} of them in place of attention's output")
    for name, k in (("H", H), ("I", I)):
        if k % (block_k * X_ROWS_PER_LOAD):
            raise ValueError(f"{name}={k} must be a multiple of {block_k * X_ROWS_PER_LOAD} "
                             f"(block_k={block_k} times {X_ROWS_PER_LOAD} chunks a load)")


def op_inputs_and_outputs(chain: PersistentChain, x0, wqkv, wo, w13, w2):
    """For every layer and op: (weight rows, the input the kernel read, the output it wrote)."""
    H, I, NQKV = chain.H, chain.I, chain.NQKV
    for layer in range(chain.layers):
        xin = x0 if layer == 0 else chain.y[layer - 1]
        gate, up = chain.gu[layer][:I].double(), chain.gu[layer][I:].double()
        yield (wqkv[layer * NQKV:(layer + 1) * NQKV], xin, chain.qkv[layer])
        yield (wo[layer * H:(layer + 1) * H], chain.qkv[layer][:H], chain.o[layer])
        yield (w13[layer * 2 * I:(layer + 1) * 2 * I], chain.o[layer], chain.gu[layer])
        yield (w2[layer * H:(layer + 1) * H], torch.nn.functional.silu(gate) * up,
               chain.y[layer])


# Random layers square the row's size each block (silu(gate) * up), so it shrinks or grows
# without bound; below this norm the products of an fp32 row and the weights leave fp32's range.
UNDERFLOW = 1e-25


def worst_op_error(chain: PersistentChain, x0, wqkv, wo, w13, w2) -> float:
    """Largest ||out - ref|| / ||ref|| over all ops, each op checked in float64 on the input the
    kernel itself read: random layers shrink or blow up the row, and this way no layer's
    check depends on another's. Ops whose reference is below UNDERFLOW or not finite (the row
    has shrunk past fp32's products or overflowed by then) are skipped; an output that is not
    finite where its reference is counts as an infinite error."""
    worst = 0.0
    for w, xin, got in op_inputs_and_outputs(chain, x0, wqkv, wo, w13, w2):
        want = w.double() @ xin.double()
        norm = want.norm().item()
        if UNDERFLOW < norm < float("inf"):
            err = ((got.double() - want).norm() / norm).item()
            worst = max(worst, err if math.isfinite(err) else float("inf"))
    return worst


def random_chain_weights(H, NQKV, I, layers, device, dtype=torch.bfloat16, seed=0):
    """wqkv, wo, w13, w2 stacked over layers, each row scaled to keep a row's size."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def weight(n, k):
        return (torch.randn(layers * n, k, device=device, generator=gen) * k ** -0.5).to(dtype)
    return weight(NQKV, H), weight(H, H), weight(2 * I, H), weight(H, I)


def engine_chain(x0, wqkv, wo, w13, w2, layers):
    """The same chain through the engine's decode kernels, one launch per op (PDL between them
    on Hopper), as graph/llama.py runs them."""
    H, I = wo.shape[1], w2.shape[1]
    NQKV = wqkv.shape[0] // layers
    x = x0.to(wo.dtype)[None]
    for layer in range(layers):
        qkv = linear(x, wqkv[layer * NQKV:(layer + 1) * NQKV])
        o = linear(qkv[:, :H], wo[layer * H:(layer + 1) * H])
        x = linear(gate_up_silu(o, w13[layer * 2 * I:(layer + 1) * 2 * I]),
                   w2[layer * H:(layer + 1) * H])
    return x


CONFIGS = ((64, 128, 8, 8), (64, 128, 4, 8), (32, 128, 16, 8), (128, 128, 4, 8), (64, 128, 8, 4))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    parser.add_argument("--bandwidth", type=float, default=4.3,
                        help="TB/s for the bytes-time column (an H200 copies at ~4.2-4.3)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        raise SystemExit("bench.persistent_chain needs a Hopper or newer CUDA GPU (TMA and "
                         "warp specialisation)")
    device = torch.device("cuda", 0)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
          f"triton {triton.__version__}, bf16, batch 1; device us a step from a CUDA graph")
    print("| shape | chain | block_n, block_k, stages, warps | us a step | TB/s | "
          "worst op rel. error |\n| --- | --- | --- | --- | --- | --- |")
    for name in args.shapes:
        c = SHAPES[name]
        H, I, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        NQKV = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        weights = random_chain_weights(H, NQKV, I, L, device)
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        x0 = torch.randn(H, device=device)
        print(f"| {name} | weight bytes at {args.bandwidth} TB/s | | "
              f"{nbytes / args.bandwidth / 1e6:.1f} | | |")
        us = device_us(lambda: engine_chain(x0, *weights, L))
        print(f"| {name} | engine kernels | | {us:.1f} | {nbytes / us / 1e6:.2f} | |", flush=True)
        for block_n, block_k, stages, warps in CONFIGS:
            chain = PersistentChain(*weights, L, block_n, block_k, stages, warps)
            chain(x0)
            err = worst_op_error(chain, x0, *weights)
            us = device_us(lambda: chain(x0))
            print(f"| {name} | persistent | {block_n}, {block_k}, {stages}, {warps} | {us:.1f} | "
                  f"{nbytes / us / 1e6:.2f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
