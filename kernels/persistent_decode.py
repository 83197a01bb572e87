"""A whole batch-1 decode step in ONE persistent, warp-specialised Gluon launch (Hopper):
embedding row -> every layer (RMSNorm, QKV, rotary and the KV-cache write, attention, wo and the
residual, RMSNorm, gate+up, SiLU, w2 and the residual) -> final RMSNorm -> head logits.

Why one launch: at batch 1 a step reads every weight once, and a chain of ~7 kernels a layer
pays each kernel's ramp and tail (kernels/NOTES.md, sessions 6-11). Here each program (one per
SM) runs two partitions:
- a loader warp walks every weight tile the program owns, op after op and layer after layer,
  through a ring of shared-memory slots filled by TMA. It waits for a free slot and keeps at
  most IN_FLIGHT copies on their way (the program's own loads and grid waits queue behind
  them), so the next op's weights land while the current op, or attention, is finishing. It
  waits for the compute once a layer: a layer's gate+up copies start only when the program is
  past that layer's attention, whose K/V loads would otherwise queue behind them;
- the compute warps wait on a grid-wide counter until an op's input is complete, stage that
  input row in shared memory (residual add and RMSNorm, or SiLU-and-multiply, on the way), and
  multiply each weight tile as its mbarrier completes.

An op's tiles are (row block, K chunk) units in row-major order, split into equal contiguous
ranges. A row block is thus summed by a few consecutive programs; each writes its partial into
its own slot (its rank among them) and the consumer adds the slots in rank order, so the step is
deterministic: a CUDA graph and an eager launch give the same bits. The head's row blocks have at
most two contributors (the launcher checks), whose fp32 atomics on a zeroed row commute exactly.

Activations are rounded to the weights' dtype where the engine's per-op kernels round them (GEMV
outputs, the residual, the normed row, q/k/v after rotary, attention's output, SiLU's output), so
both paths compute the same function up to the order of fp32 sums.

Attention of the new token: units of (query head, split) are spread over the programs. A head's
positions are cut into tiles of TILE positions and the tiles into at most SPLITS runs (SPLITS =
programs // heads, so every unit fits in one wave); a unit folds its tiles in with an online
softmax, the block table two tiles ahead and K/V one tile ahead of the fold. The heads of a GQA
group read the same K/V tile, from L2 after the first. The unit holding the newest position takes
it from registers, and the group's first head writes it into the cache. With several splits the
last unit of a head to arrive combines them in split order.

Status (H200, 2026-12-03, sessions 15-17): a 1B step replays in 0.79 ms against 0.98 for the
per-op kernels, an 8B step in 3.92 ms against 4.39 (98% of the copy-bandwidth roofline); a ring
of 13 tiles (w2's input packed at 8B to make room) then took the 8B kernel alone from 3.97 to
3.91 ms, and holding gate+up's copies until attention is done took the 1B kernel from 0.755 to
0.745 ms. Past 8 tiles a unit each unit's tiles are a long latency chain on a few programs and
the per-op kernels win, so runtime/persistent_decode.py runs it for sequences up to
`longest_context` (4096 positions at 1B, 2048 at 8B) and hands longer ones to the per-op kernels.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

# Gluon is young and renamed these between triton 3.6 and 3.9
cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
NEW_SMEM_API = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))

SPLIT_TILE = gl.constexpr(32)     # attention partials the combining program reads at once
OPS_PER_LAYER = gl.constexpr(5)   # qkv, attention, wo, gate+up, w2: each ends in P releases


# ---- shared by both partitions -----------------------------------------------------------
@gluon.jit
def unit_range(units: gl.constexpr, pid, P: gl.constexpr):
    return units * pid // P, units * (pid + 1) // P


@gluon.jit
def _owner(unit, units: gl.constexpr, P: gl.constexpr):
    # the program whose range holds `unit`: the largest p with units * p // P <= unit
    return ((unit + 1) * P + units - 1) // units - 1


# ---- the loader warp -----------------------------------------------------------------------
@gluon.jit
def load_op(desc, row0, bufs, ready, empty, it, pid, P: gl.constexpr, N: gl.constexpr,
            K: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
            IN_FLIGHT: gl.constexpr):
    KC: gl.constexpr = K // BK
    u0, u1 = unit_range((N // BN) * KC, pid, P)
    for u in range(u0, u1):
        slot = it % STAGES
        mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)  # the first lap passes
        if it >= IN_FLIGHT:
            # at most IN_FLIGHT copies on their way: this SM's grid waits, staging loads and
            # attention loads queue behind its copies' bytes, so a full ring of copies in flight
            # would make each of them ~5 us (landed tiles still fill the ring while compute waits)
            back = it - IN_FLIGHT
            mbarrier.wait(ready.index(back % STAGES), (back // STAGES) & 1)
        mbarrier.expect(ready.index(slot), desc.block_type.nbytes)
        tma_load(desc, [row0 + (u // KC) * BN, (u % KC) * BK], ready.index(slot),
                 bufs.index(slot))
        it += 1
    return it


@gluon.jit
def _loader(wqkv_desc, wo_desc, w13_desc, w2_desc, head_desc, bufs, ready, empty, L,
            P: gl.constexpr, H: gl.constexpr, NQKV: gl.constexpr, I: gl.constexpr,
            V: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
            IN_FLIGHT: gl.constexpr):
    pid = gl.program_id(0)
    it = 0
    # a program with no gate+up tiles holds nothing; its compute never waits on this loader, so
    # it could arrive on past_attention two layers ahead and a parity wait would miss a phase
    gu_lo, gu_hi = unit_range((2 * I // BN) * (H // BK), pid, P)
    for layer in range(L):
        it = load_op(wqkv_desc, layer * NQKV, bufs, ready, empty, it, pid, P, NQKV, H, BN, BK,
                     STAGES, IN_FLIGHT)
        it = load_op(wo_desc, layer * H, bufs, ready, empty, it, pid, P, H, H, BN, BK, STAGES,
                     IN_FLIGHT)
        if gu_hi > gu_lo:
            mbarrier.wait(past_attention(empty, STAGES), layer & 1)
        it = load_op(w13_desc, layer * 2 * I, bufs, ready, empty, it, pid, P, 2 * I, H, BN, BK,
                     STAGES, IN_FLIGHT)
        it = load_op(w2_desc, layer * H, bufs, ready, empty, it, pid, P, H, I, BN, BK, STAGES,
                     IN_FLIGHT)
    load_op(head_desc, 0, bufs, ready, empty, it, pid, P, V, H, BN, BK, STAGES, IN_FLIGHT)


# ---- grid-wide order -----------------------------------------------------------------------
@gluon.jit
def wait_count(counter_ptr, target):
    seen = gl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = gl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")


@gluon.jit
def release(counter_ptr):
    cta_barrier()  # every thread's stores come before the release below
    gl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@gluon.jit
def past_attention(empty, STAGES: gl.constexpr):
    """The barrier the compute arrives on once a layer, when its attention units are done; the
    loader holds that layer's gate+up copies until then (one phase a layer)."""
    return empty.index(STAGES)


@gluon.jit
def shared_buffers(desc, STAGES: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                   X_CHUNKS: gl.constexpr, X_DTYPE: gl.constexpr):
    """The weight ring (STAGES tiles of desc's type, with its ready and empty barriers set up,
    `empty` one longer for past_attention) and the input row staged as [X_CHUNKS, BK] of
    X_DTYPE."""
    bufs = gl.allocate_shared_memory(desc.dtype, [STAGES, BN, BK], desc.layout)
    x_smem = gl.allocate_shared_memory(X_DTYPE, [X_CHUNKS, BK],
                                       gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES + 1, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    mbarrier.init(past_attention(empty, STAGES), count=1)
    fence_async_shared()
    return bufs, ready, empty, x_smem


@gluon.jit
def _rounded(x, DT: gl.constexpr):
    return x.to(DT).to(gl.float32)


@gluon.jit
def _slot_sum(slots_ptr, offs, N: gl.constexpr, K: gl.constexpr, BN: gl.constexpr,
              BK: gl.constexpr, S: gl.constexpr, P: gl.constexpr, need=None):
    """Elements `offs` of an op's output [N]: its row blocks' partials, added in rank order.
    A block's writers are the programs from the owner of its first unit to the owner of its
    last; writer j stored into slot j. Programs between them with no units at all (an op of
    fewer units than programs) wrote nothing, so their slots are skipped. Where `need` is
    given, only the elements it marks are read (the others are 0)."""
    KC: gl.constexpr = K // BK
    units: gl.constexpr = (N // BN) * KC
    block = offs // BN
    first = _owner(block * KC, units, P)
    extra = _owner(block * KC + KC - 1, units, P) - first
    # .cg: written by other programs, so read from L2, never from a stale L1 line
    if need is None:
        total = gl.load(slots_ptr + offs, cache_modifier=".cg")
    else:
        total = gl.load(slots_ptr + offs, mask=need, other=0.0, cache_modifier=".cg")
    for j in gl.static_range(1, S):
        wrote = (extra >= j) & (units * (first + j + 1) // P > units * (first + j) // P)
        if need is not None:
            wrote = wrote & need
        total += gl.load(slots_ptr + j * N + offs, mask=wrote, other=0.0, cache_modifier=".cg")
    return total


# ---- staging an op's input row into shared memory ----------------------------------------------
@gluon.jit
def _chunk_offsets(ROWS: gl.constexpr, BK: gl.constexpr, XL: gl.constexpr):
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, XL))
    cols = gl.arange(0, BK, layout=gl.SliceLayout(0, XL))
    return rows[:, None] * BK + cols[None, :]


@gluon.jit
def _stage_normed(prev_ptr, delta_ptr, sum_ptr, norm_ptr, eps, x_smem, keep_r,
                  HAS_DELTA: gl.constexpr, KEEP_R: gl.constexpr, H: gl.constexpr,
                  DELTA_K: gl.constexpr, S: gl.constexpr, P: gl.constexpr, BN: gl.constexpr,
                  BK: gl.constexpr, ROWS: gl.constexpr, XL: gl.constexpr, DT: gl.constexpr):
    """x = RMSNorm(prev + delta) * norm into x_smem; the sum is the new residual, which one
    program (keep_r) stores for the ops after this one."""
    GROUPS: gl.constexpr = H // BK // ROWS
    offs0 = _chunk_offsets(ROWS, BK, XL)
    squares = gl.zeros([ROWS, BK], gl.float32, XL)
    for c in gl.static_range(GROUPS):
        offs = c * ROWS * BK + offs0
        r = gl.load(prev_ptr + offs, cache_modifier=".cg").to(gl.float32)
        if HAS_DELTA:
            delta = _rounded(_slot_sum(delta_ptr, offs, H, DELTA_K, BN, BK, S, P), DT)
            r = _rounded(r + delta, DT)
        if KEEP_R:
            gl.store(sum_ptr + offs, r, mask=(offs >= 0) & keep_r)
        squares += r * r
        x_smem.index(c).store(r.to(DT))
        # the norm's weights wait beside the row (row_chunks leaves room): loaded with it, not
        # a second round trip after the sum of squares
        x_smem.index(GROUPS + c).store(gl.load(norm_ptr + offs))
    rstd = gl.rsqrt(gl.sum(gl.sum(squares, axis=1), axis=0) / H + eps)
    for c in gl.static_range(GROUPS):
        # each thread reads back the elements it stored itself: no barrier needed before this
        r = x_smem.index(c).load(XL).to(gl.float32)
        w = x_smem.index(GROUPS + c).load(XL).to(gl.float32)
        x_smem.index(c).store((_rounded(r * rstd, DT) * w).to(DT))
    cta_barrier()


@gluon.jit
def _stage_attention_out(attn_ptr, x_smem, H: gl.constexpr, BK: gl.constexpr,
                         ROWS: gl.constexpr, XL: gl.constexpr):
    offs0 = _chunk_offsets(ROWS, BK, XL)
    for c in gl.static_range(H // BK // ROWS):
        v = gl.load(attn_ptr + c * ROWS * BK + offs0, cache_modifier=".cg")
        x_smem.index(c).store(v.to(x_smem.dtype))
    cta_barrier()


@gluon.jit
def _silu_times(gate, up, DT: gl.constexpr):
    return (gate / (1.0 + gl.exp(-gate)) * up).to(DT)


@gluon.jit
def _silu_inputs(gu_slots, group, valid, first, u0, n, chunk, offs0, H: gl.constexpr,
                 I: gl.constexpr, S: gl.constexpr, P: gl.constexpr, BN: gl.constexpr,
                 BK: gl.constexpr, ROWS: gl.constexpr, W: gl.constexpr):
    """Gate and up for one group of ROWS slots of the staged row: slot s holds the K chunk of
    the program's unit u0 + (s + first) % W, read only where that is one of its n units."""
    KC: gl.constexpr = I // BK
    ahead = (group * ROWS + chunk + first) % W
    if W == KC:   # the whole row: slot s holds chunk s
        offs = group * ROWS * BK + offs0
    else:
        offs = ((u0 + ahead) % KC * BK)[:, None] + offs0 % BK
    need = ((ahead < n) & valid)[:, None]
    return (_slot_sum(gu_slots, offs, 2 * I, H, BN, BK, S, P, need),
            _slot_sum(gu_slots, offs + I, 2 * I, H, BN, BK, S, P, need))


@gluon.jit
def _stage_silu(gu_slots, x_smem, pid, H: gl.constexpr, I: gl.constexpr, S: gl.constexpr,
                P: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, ROWS: gl.constexpr,
                W: gl.constexpr, XL: gl.constexpr, DT: gl.constexpr):
    """SiLU(gate) * up into x_smem, only for the K chunks this program's w2 units multiply
    (unit u's chunk in slot u % W, as gemv reads it): a program's units cover part of one or two
    row blocks, so it needs about half of the row at 8B and a quarter at 1B. Where W is less
    than the row's chunks, the row is packed so, and the room the rest would take went to the
    weight ring (runtime/persistent_decode.row_chunks). Two groups of slots a round trip, from
    the group of the first unit's slot on."""
    GROUPS: gl.constexpr = W // ROWS
    u0, u1 = unit_range((H // BN) * (I // BK), pid, P)
    n = gl.minimum(u1 - u0, W)
    first = W - u0 % W
    start = u0 % W // ROWS
    groups = gl.minimum((u0 % ROWS + n + ROWS - 1) // ROWS, GROUPS)
    offs0 = _chunk_offsets(ROWS, BK, XL)
    chunk = gl.arange(0, ROWS, layout=gl.SliceLayout(1, XL))
    for j in range(0, groups, 2):
        ga = (start + j) % GROUPS
        gb = (start + j + 1) % GROUPS
        gate_a, up_a = _silu_inputs(gu_slots, ga, True, first, u0, n, chunk, offs0, H, I, S, P,
                                    BN, BK, ROWS, W)
        gate_b, up_b = _silu_inputs(gu_slots, gb, j + 1 < groups, first, u0, n, chunk, offs0, H,
                                    I, S, P, BN, BK, ROWS, W)
        x_smem.index(ga).store(_silu_times(gate_a, up_a, DT))
        if j + 1 < groups:   # else gb may be the first group again
            x_smem.index(gb).store(_silu_times(gate_b, up_b, DT))
    cta_barrier()


# ---- one GEMV op: this program's weight tiles against the staged row ---------------------------
@gluon.jit
def _flush(out_ptr, acc, block, rows, pid, P: gl.constexpr, N: gl.constexpr, KC: gl.constexpr,
           units: gl.constexpr, BN: gl.constexpr, ATOMIC: gl.constexpr):
    part = gl.sum(acc, axis=1)
    if ATOMIC:
        gl.atomic_add(out_ptr + block * BN + rows, part, sem="relaxed", scope="gpu")
    else:
        rank = pid - _owner(block * KC, units, P)
        gl.store(out_ptr + rank * N + block * BN + rows, part)


@gluon.jit
def gemv(out_ptr, x_rows, bufs, ready, empty, it, pid, P: gl.constexpr, N: gl.constexpr,
         K: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
         ATOMIC: gl.constexpr, TL: gl.constexpr, W: gl.constexpr):
    """This program's units of an [N, K] GEMV against the staged row, unit u's K chunk in row
    u % W of it: the whole row where W = K // BK, else as _stage_silu packs it."""
    KC: gl.constexpr = K // BK
    units: gl.constexpr = (N // BN) * KC
    u0, u1 = unit_range(units, pid, P)
    rows = gl.arange(0, BN, layout=gl.SliceLayout(1, TL))
    acc = gl.zeros([BN, BK], gl.float32, TL)
    block = u0 // KC
    for u in range(u0, u1):
        if u // KC != block:
            _flush(out_ptr, acc, block, rows, pid, P, N, KC, units, BN, ATOMIC)
            acc = gl.zeros([BN, BK], gl.float32, TL)
            block = u // KC
        slot = it % STAGES
        mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
        w = bufs.index(slot).load(TL)
        cta_barrier()  # every warp has read the slot before the loader may refill it
        mbarrier.arrive(empty.index(slot))
        x = x_rows.index(u % W).load(gl.SliceLayout(0, TL)).to(gl.float32)
        acc += w.to(gl.float32) * x[None, :]
        it += 1
    if u1 > u0:
        _flush(out_ptr, acc, block, rows, pid, P, N, KC, units, BN, ATOMIC)
    return it


# ---- attention ---------------------------------------------------------------------------------
@gluon.jit
def _rotated(qkv_slots, off, d, cos, sin, NQKV: gl.constexpr, H: gl.constexpr,
             BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, P: gl.constexpr,
             HALF: gl.constexpr, DT: gl.constexpr):
    """One head of the QKV output, rounded, rotated (rotate_half pairs) and rounded again."""
    x1 = _rounded(_slot_sum(qkv_slots, off + d, NQKV, H, BN, BK, S, P), DT)
    x2 = _rounded(_slot_sum(qkv_slots, off + HALF + d, NQKV, H, BN, BK, S, P), DT)
    return _rounded(x1 * cos - x2 * sin, DT), _rounded(x2 * cos + x1 * sin, DT)


@gluon.jit
def _combine(qh, n_split, attn_ptr, acc_ptr, ml_ptr, D: gl.constexpr,
             SPLITS: gl.constexpr, DT: gl.constexpr, KL: gl.constexpr):
    """A query head's output from all its chunks' partials, in chunk order."""
    HALF: gl.constexpr = D // 2
    d = gl.arange(0, HALF, layout=gl.SliceLayout(0, KL))
    lanes = gl.arange(0, SPLIT_TILE, layout=gl.SliceLayout(1, KL))
    first = qh * SPLITS   # chunk s's partial is first + s
    m_lane = gl.full([SPLIT_TILE], float("-inf"), gl.float32, gl.SliceLayout(1, KL))
    for s0 in range(0, n_split, SPLIT_TILE):
        m_lane = gl.maximum(m_lane, gl.load(ml_ptr + 2 * (first + s0 + lanes),
                                            mask=s0 + lanes < n_split, other=float("-inf"),
                                            cache_modifier=".cg"))
    m_all = gl.max(m_lane, axis=0)
    l_lane = gl.zeros([SPLIT_TILE], gl.float32, gl.SliceLayout(1, KL))
    a1 = gl.zeros([SPLIT_TILE, HALF], gl.float32, KL)
    a2 = gl.zeros([SPLIT_TILE, HALF], gl.float32, KL)
    for s0 in range(0, n_split, SPLIT_TILE):
        ok = s0 + lanes < n_split
        part = first + s0 + lanes
        scale = gl.exp(gl.load(ml_ptr + 2 * part, mask=ok, other=float("-inf"),
                               cache_modifier=".cg") - m_all)
        l_lane += scale * gl.load(ml_ptr + 2 * part + 1, mask=ok, other=0.0, cache_modifier=".cg")
        rows = part[:, None] * D + d[None, :]
        a1 += scale[:, None] * gl.load(acc_ptr + rows, mask=ok[:, None], other=0.0,
                                       cache_modifier=".cg")
        a2 += scale[:, None] * gl.load(acc_ptr + rows + HALF, mask=ok[:, None], other=0.0,
                                       cache_modifier=".cg")
    total = gl.sum(l_lane, axis=0)
    gl.store(attn_ptr + qh * D + d, _rounded(gl.sum(a1, axis=0) / total, DT))
    gl.store(attn_ptr + qh * D + HALF + d, _rounded(gl.sum(a2, axis=0) / total, DT))


@gluon.jit
def _tile_blocks(table_ptr, table_stride, tile, valid, seq_len, TILE: gl.constexpr,
                 BS: gl.constexpr, KL: gl.constexpr):
    """The cache blocks of a tile's TILE positions (one entry a position) and which of those
    positions to read from the cache: the newest comes from registers."""
    t = tile * TILE + gl.arange(0, TILE, layout=gl.SliceLayout(1, KL))
    cached = (t < seq_len - 1) & valid
    block = gl.load(table_ptr + (t // BS) * table_stride, mask=cached, other=0).to(gl.int64)
    return cached, (block * BS + t % BS)


@gluon.jit
def _kv_tile(k_ptr, v_ptr, cached, cache_rows, kvh, d, NKV: gl.constexpr, D: gl.constexpr):
    """The cached K and V of a tile's positions for one KV head, as stored (not yet fp32)."""
    HALF: gl.constexpr = D // 2
    rows = (cache_rows * (NKV * D) + kvh * D)[:, None] + d[None, :]
    return (gl.load(k_ptr + rows, mask=cached[:, None], other=0.0),
            gl.load(k_ptr + rows + HALF, mask=cached[:, None], other=0.0),
            gl.load(v_ptr + rows, mask=cached[:, None], other=0.0),
            gl.load(v_ptr + rows + HALF, mask=cached[:, None], other=0.0))


@gluon.jit
def _fold_tile(q1, q2, scale, cached, kc1, kc2, vc1, vc2, m, total, a1, a2):
    """Online softmax: one tile of positions folded into the running max, sum and output."""
    scores = (gl.sum(kc1.to(gl.float32) * q1[None, :], axis=1)
              + gl.sum(kc2.to(gl.float32) * q2[None, :], axis=1)) * scale
    scores = gl.where(cached, scores, float("-inf"))
    m_new = gl.maximum(m, gl.max(scores, axis=0))
    shift = gl.where(m_new == float("-inf"), 0.0, m_new)   # no position yet: -inf - -inf
    alpha = gl.exp(m - shift)
    p = gl.exp(scores - shift)
    return (m_new, total * alpha + gl.sum(p, axis=0),
            a1 * alpha + gl.sum(p[:, None] * vc1.to(gl.float32), axis=0),
            a2 * alpha + gl.sum(p[:, None] * vc2.to(gl.float32), axis=0))


@gluon.jit
def _attention_unit(qh, split, n_split, per_split, tiles, seq_len, pos, slot, qkv_slots,
                    attn_ptr, acc_ptr, ml_ptr, arrivals_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr,
                    table_ptr, table_stride, scale, P: gl.constexpr, H: gl.constexpr,
                    NQKV: gl.constexpr, NH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr,
                    BN: gl.constexpr, BK: gl.constexpr, S: gl.constexpr, BS: gl.constexpr,
                    SPLITS: gl.constexpr, TILE: gl.constexpr, DT: gl.constexpr,
                    KL: gl.constexpr):
    """Query head qh over one split of the positions: tiles [split * per_split, + per_split),
    each prefetched while the one before it is folded in. One unit a query head, not a KV
    head: the unit is latency, and the heads of a group reading one K/V tile all hit L2."""
    G: gl.constexpr = NH // NKV
    HALF: gl.constexpr = D // 2
    kvh = qh // G
    d = gl.arange(0, HALF, layout=gl.SliceLayout(0, KL))
    t0 = split * per_split
    t1 = gl.minimum(t0 + per_split, tiles)
    newest_here = split == n_split - 1
    # a pipeline: the block table two tiles ahead, K and V one tile ahead of the one folded in
    c0, r0 = _tile_blocks(table_ptr, table_stride, t0, True, seq_len, TILE, BS, KL)
    c1, r1 = _tile_blocks(table_ptr, table_stride, t0 + 1, t0 + 1 < t1, seq_len, TILE, BS, KL)
    cos = gl.load(cos_ptr + pos * HALF + d)
    sin = gl.load(sin_ptr + pos * HALF + d)
    q1, q2 = _rotated(qkv_slots, qh * D, d, cos, sin, NQKV, H, BN, BK, S, P, HALF, DT)
    kc1, kc2, vc1, vc2 = _kv_tile(k_ptr, v_ptr, c0, r0, kvh, d, NKV, D)
    k1, k2 = _rotated(qkv_slots, NH * D + kvh * D, d, cos, sin, NQKV, H, BN, BK, S, P, HALF, DT)
    v_off = (NH + NKV) * D + kvh * D
    v1 = _rounded(_slot_sum(qkv_slots, v_off + d, NQKV, H, BN, BK, S, P), DT)
    v2 = _rounded(_slot_sum(qkv_slots, v_off + HALF + d, NQKV, H, BN, BK, S, P), DT)

    # the group's first query head writes the newest k and v into the cache, for later steps
    dst = slot * (NKV * D) + kvh * D + d
    write = (d >= 0) & newest_here & (qh % G == 0)
    gl.store(k_ptr + dst, k1.to(DT), mask=write)
    gl.store(k_ptr + dst + HALF, k2.to(DT), mask=write)
    gl.store(v_ptr + dst, v1.to(DT), mask=write)
    gl.store(v_ptr + dst + HALF, v2.to(DT), mask=write)

    m = gl.max(gl.full([TILE], float("-inf"), gl.float32, gl.SliceLayout(1, KL)), axis=0)
    total = gl.sum(gl.zeros([TILE], gl.float32, gl.SliceLayout(1, KL)), axis=0)
    a1 = gl.zeros([HALF], gl.float32, gl.SliceLayout(0, KL))
    a2 = gl.zeros([HALF], gl.float32, gl.SliceLayout(0, KL))
    for tile in range(t0, t1):
        c2, r2 = _tile_blocks(table_ptr, table_stride, tile + 2, tile + 2 < t1, seq_len, TILE,
                              BS, KL)
        nk1, nk2, nv1, nv2 = _kv_tile(k_ptr, v_ptr, c1, r1, kvh, d, NKV, D)
        m, total, a1, a2 = _fold_tile(q1, q2, scale, c0, kc1, kc2, vc1, vc2, m, total, a1, a2)
        c0, kc1, kc2, vc1, vc2 = c1, nk1, nk2, nv1, nv2
        c1, r1 = c2, r2

    newest = (gl.sum(k1 * q1, axis=0) + gl.sum(k2 * q2, axis=0)) * scale
    newest = gl.where(newest_here, newest, float("-inf"))
    m_all = gl.maximum(m, newest)   # finite: a split holds a cached position or the newest
    alpha = gl.exp(m - m_all)
    p_new = gl.exp(newest - m_all)
    total = total * alpha + p_new
    a1 = a1 * alpha + p_new * v1
    a2 = a2 * alpha + p_new * v2
    if n_split == 1:
        gl.store(attn_ptr + qh * D + d, _rounded(a1 / total, DT))
        gl.store(attn_ptr + qh * D + HALF + d, _rounded(a2 / total, DT))
    else:
        part = qh * SPLITS + split
        gl.store(acc_ptr + part * D + d, a1)
        gl.store(acc_ptr + part * D + HALF + d, a2)
        gl.store(ml_ptr + 2 * part, m_all)
        gl.store(ml_ptr + 2 * part + 1, total)
        cta_barrier()  # every thread's partials come before the arrival's release
        if gl.atomic_add(arrivals_ptr + qh, 1, sem="acq_rel", scope="gpu") == n_split - 1:
            gl.atomic_xchg(arrivals_ptr + qh, 0, sem="relaxed", scope="gpu")
            _combine(qh, n_split, attn_ptr, acc_ptr, ml_ptr, D, SPLITS, DT, KL)


# ---- the compute partition: every op of the step in order -------------------------------------
@gluon.jit
def _compute(ids_ptr, pos_ptr, slot_ptr, len_ptr, table_ptr, table_stride, embed_ptr,
             attn_norm_ptr, ffn_norm_ptr, final_norm_ptr, cos_ptr, sin_ptr, kv_ptr,
             layer_stride, v_offset, qkv_slots, wo_slots, gu_slots, w2_slots, res_in_ptr,
             res_mid_ptr, attn_ptr, acc_ptr, ml_ptr, arrivals_ptr, logits_ptr, counter_ptr, eps,
             scale, x_smem, bufs, ready, empty, L, P: gl.constexpr, H: gl.constexpr,
             NQKV: gl.constexpr, I: gl.constexpr, V: gl.constexpr, NH: gl.constexpr,
             NKV: gl.constexpr, D: gl.constexpr, BS: gl.constexpr, SPLITS: gl.constexpr,
             TILE: gl.constexpr, S_QKV: gl.constexpr, S_WO: gl.constexpr, S_GU: gl.constexpr,
             S_W2: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
             ROWS: gl.constexpr, TL: gl.constexpr, XL: gl.constexpr, KL: gl.constexpr,
             ZL: gl.constexpr, DT: gl.constexpr):
    pid = gl.program_id(0)
    # the same bytes seen as rows of BK, so that a tile's slice of x is one dynamic index
    ROW_LAYOUT: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    # and as [chunks of ROWS rows, ROWS, BK], so that staging indexes a chunk at run time
    CHUNK_SHAPE: gl.constexpr = [x_smem.shape[0] // ROWS, ROWS, x_smem.shape[1]]
    if NEW_SMEM_API:
        x_rows = x_smem.reinterpret(DT, x_smem.shape, ROW_LAYOUT)
        x_smem = x_smem.reinterpret(DT, CHUNK_SHAPE, x_smem.layout)
    else:
        x_rows = x_smem._reinterpret(DT, x_smem.shape, ROW_LAYOUT)
        x_smem = x_smem._reinterpret(DT, CHUNK_SHAPE, x_smem.layout)
    # w2's input holds unit u's K chunk in slot u % W2: the whole row where there is room for
    # it, else packed (a program's units, at most w2_chunks in a row, land in distinct slots)
    W2: gl.constexpr = x_rows.shape[0] if x_rows.shape[0] < I // BK else I // BK
    # the head adds into the logits: this program's share is zeroed here, before its first
    # release, so it is zero long before any program reaches the head
    lo, hi = unit_range(V, pid, P)
    zeros_at = gl.arange(0, 1024, layout=ZL)
    for start in range(lo, hi, 1024):
        gl.store(logits_ptr + start + zeros_at, gl.zeros([1024], gl.float32, ZL),
                 mask=start + zeros_at < hi)
    token = gl.load(ids_ptr)
    pos = gl.load(pos_ptr)
    slot = gl.load(slot_ptr)
    seq_len = gl.load(len_ptr)
    # at most SPLITS programs a query head, each over a run of whole tiles
    tiles = (seq_len + TILE - 1) // TILE
    per_split = (tiles + SPLITS - 1) // SPLITS
    n_split = (tiles + per_split - 1) // per_split
    keep_r = pid == 0
    it = 0
    for layer in range(L):
        op = OPS_PER_LAYER * layer
        wait_count(counter_ptr, P * op)
        if layer == 0:
            _stage_normed(embed_ptr + token * H, w2_slots, res_in_ptr, attn_norm_ptr, eps,
                          x_smem, keep_r, False, True, H, I, S_W2, P, BN, BK, ROWS, XL, DT)
        else:
            _stage_normed(res_mid_ptr, w2_slots, res_in_ptr, attn_norm_ptr + layer * H, eps,
                          x_smem, keep_r, True, True, H, I, S_W2, P, BN, BK, ROWS, XL, DT)
        it = gemv(qkv_slots, x_rows, bufs, ready, empty, it, pid, P, NQKV, H, BN, BK, STAGES,
                   False, TL, H // BK)
        release(counter_ptr)

        wait_count(counter_ptr, P * (op + 1))
        k_ptr = kv_ptr + layer.to(gl.int64) * layer_stride
        for unit in range(pid, NH * n_split, P):
            _attention_unit(unit % NH, unit // NH, n_split, per_split, tiles, seq_len, pos, slot,
                            qkv_slots,
                            attn_ptr, acc_ptr, ml_ptr, arrivals_ptr, k_ptr, k_ptr + v_offset,
                            cos_ptr, sin_ptr, table_ptr, table_stride, scale, P, H, NQKV, NH,
                            NKV, D, BN, BK, S_QKV, BS, SPLITS, TILE, DT, KL)
        release(counter_ptr)
        mbarrier.arrive(past_attention(empty, STAGES))

        wait_count(counter_ptr, P * (op + 2))
        _stage_attention_out(attn_ptr, x_smem, H, BK, ROWS, XL)
        it = gemv(wo_slots, x_rows, bufs, ready, empty, it, pid, P, H, H, BN, BK, STAGES,
                   False, TL, H // BK)
        release(counter_ptr)

        wait_count(counter_ptr, P * (op + 3))
        _stage_normed(res_in_ptr, wo_slots, res_mid_ptr, ffn_norm_ptr + layer * H, eps, x_smem,
                      keep_r, True, True, H, H, S_WO, P, BN, BK, ROWS, XL, DT)
        it = gemv(gu_slots, x_rows, bufs, ready, empty, it, pid, P, 2 * I, H, BN, BK, STAGES,
                   False, TL, H // BK)
        release(counter_ptr)

        wait_count(counter_ptr, P * (op + 4))
        _stage_silu(gu_slots, x_smem, pid, H, I, S_GU, P, BN, BK, ROWS, W2, XL, DT)
        it = gemv(w2_slots, x_rows, bufs, ready, empty, it, pid, P, H, I, BN, BK, STAGES,
                   False, TL, W2)
        release(counter_ptr)

    wait_count(counter_ptr, P * OPS_PER_LAYER * L)
    _stage_normed(res_mid_ptr, w2_slots, res_mid_ptr, final_norm_ptr, eps, x_smem, keep_r, True,
                  False, H, I, S_W2, P, BN, BK, ROWS, XL, DT)
    gemv(logits_ptr, x_rows, bufs, ready, empty, it, pid, P, V, H, BN, BK, STAGES, True, TL,
         H // BK)
    # the last program out leaves the counter at zero for the next launch (or graph replay)
    cta_barrier()
    last = P * (OPS_PER_LAYER * L + 1) - 1
    if gl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == last:
        gl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")


@gluon.jit
def persistent_decode_kernel(
        wqkv_desc, wo_desc, w13_desc, w2_desc, head_desc, ids_ptr, pos_ptr, slot_ptr, len_ptr,
        table_ptr, table_stride, embed_ptr, attn_norm_ptr, ffn_norm_ptr, final_norm_ptr,
        cos_ptr, sin_ptr, kv_ptr, layer_stride, v_offset, qkv_slots, wo_slots, gu_slots,
        w2_slots, res_in_ptr, res_mid_ptr, attn_ptr, acc_ptr, ml_ptr, arrivals_ptr, logits_ptr,
        counter_ptr, eps, scale, L, P: gl.constexpr, H: gl.constexpr, NQKV: gl.constexpr,
        I: gl.constexpr, V: gl.constexpr, NH: gl.constexpr, NKV: gl.constexpr, D: gl.constexpr,
        BS: gl.constexpr, SPLITS: gl.constexpr, TILE: gl.constexpr, S_QKV: gl.constexpr,
        S_WO: gl.constexpr, S_GU: gl.constexpr, S_W2: gl.constexpr, BN: gl.constexpr,
        BK: gl.constexpr, STAGES: gl.constexpr, IN_FLIGHT: gl.constexpr, ROWS: gl.constexpr,
        X_CHUNKS: gl.constexpr, num_warps: gl.constexpr):
    DT: gl.constexpr = embed_ptr.dtype.element_ty
    # 16-byte vectors along K: a warp reads two full 256-byte tile rows, free of bank conflicts
    TL: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
    XL: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])
    # attention tiles are [positions, D / 2]: 8-element vectors, a warp across the half head
    KL_COLS: gl.constexpr = D // 16
    KL: gl.constexpr = gl.BlockedLayout([1, 8], [32 // KL_COLS, KL_COLS], [num_warps, 1], [1, 0])
    ZL: gl.constexpr = gl.BlockedLayout([4], [32], [num_warps], [0])
    bufs, ready, empty, x_smem = shared_buffers(wqkv_desc, STAGES, BN, BK, X_CHUNKS, DT)
    gl.warp_specialize([
        (_compute, (ids_ptr, pos_ptr, slot_ptr, len_ptr, table_ptr, table_stride, embed_ptr,
                    attn_norm_ptr, ffn_norm_ptr, final_norm_ptr, cos_ptr, sin_ptr, kv_ptr,
                    layer_stride, v_offset, qkv_slots, wo_slots, gu_slots, w2_slots, res_in_ptr,
                    res_mid_ptr, attn_ptr, acc_ptr, ml_ptr, arrivals_ptr, logits_ptr, counter_ptr,
                    eps, scale, x_smem, bufs, ready, empty, L, P, H, NQKV, I, V, NH, NKV, D, BS,
                    SPLITS, TILE, S_QKV, S_WO, S_GU, S_W2, BN, BK, STAGES, ROWS, TL, XL, KL, ZL,
                    DT)),
        (_loader, (wqkv_desc, wo_desc, w13_desc, w2_desc, head_desc, bufs, ready, empty, L, P, H,
                   NQKV, I, V, BN, BK, STAGES, IN_FLIGHT)),
    ], [1], [40])
