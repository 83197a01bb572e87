import pytest
import torch
import torch.nn.functional as F

from conftest import TOL, rel_err
from kernels.attention import paged_attention, paged_attention_ref, paged_attention_triton
from kernels import arrival, attention_decode
from kernels.attention_decode import NewTokens, paged_decode_triton
from kernels.rotary import rope_tables, rotary_cache_write_ref, rotary_cache_write_triton


def make_batch(seq_lens, q_lens, n_heads, n_kv, hd, block_size, dtype):
    """Random paged cache with shuffled block tables, and q rows for each sequence's last
    q_lens[b] positions (q_len < seq_len: a prompt extending a cached prefix)."""
    B = len(seq_lens)
    max_blocks = max(-(-n // block_size) for n in seq_lens) + 1
    num_blocks = B * max_blocks + 2
    k_cache = torch.randn(num_blocks, block_size, n_kv, hd, dtype=dtype)
    v_cache = torch.randn(num_blocks, block_size, n_kv, hd, dtype=dtype)
    block_tables = torch.randperm(num_blocks)[:B * max_blocks].view(B, max_blocks).to(torch.int32)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    # q is a strided view into a wider buffer, as the model slices it out of qkv
    buf = torch.randn(int(qsl[-1]), n_heads + 2 * n_kv, hd, dtype=dtype)
    q = buf[:, :n_heads]
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return q, k_cache, v_cache, block_tables, lens, qsl


def check(seq_lens, q_lens, n_heads, n_kv, hd, block_size, dtype, **kw):
    q, kc, vc, bt, lens, qsl = make_batch(seq_lens, q_lens, n_heads, n_kv, hd, block_size, dtype)
    scale = hd ** -0.5
    args = (q, kc, vc, bt, lens, qsl, max(q_lens), scale)
    if kw:
        out = paged_decode_triton(q, kc, vc, bt, lens, qsl, scale, **kw)
    else:
        out = paged_attention_triton(*args)
    ref = paged_attention_ref(*[a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                                for a in args])
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < TOL[dtype]


# seq lens on and off the 16-row block boundary, length 1, and ragged
DECODE_LENS = [[1, 16, 33], [47], [32, 5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_heads,n_kv", [(2, 2), (8, 2), (8, 1)])  # GQA 1, 4, 8
@pytest.mark.parametrize("hd", [64, 128])
def test_decode_matches_ref(dtype, n_heads, n_kv, hd):
    for lens in DECODE_LENS:
        check(lens, [1] * len(lens), n_heads, n_kv, hd, 16, dtype)


@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.parametrize("max_seq_len", [None, 48])
def test_decode_split_counts(splits, max_seq_len):
    # 5 splits of a 48-long range: chunks of 10, so splits end mid-block and some exit early
    check([1, 16, 33, 48], [1, 1, 1, 1], 4, 1, 64, 8, torch.float32, num_splits=splits,
          max_seq_len=max_seq_len)


def test_decode_reads_a_transposed_int64_table():
    """The decode graphs pass their packed [field, sequence] input: the table as an int64
    [B, max_blocks] view with strides (1, B), and int64 lengths."""
    q, kc, vc, bt, lens, qsl = make_batch([3, 40, 17], [1, 1, 1], 8, 2, 64, 16, torch.float32)
    packed = torch.full((bt.shape[1], 5), -7, dtype=torch.int64)   # wider than the batch
    packed[:, :3] = bt.t()
    table = packed[:, :3].t()
    assert table.stride() == (1, 5)
    out = paged_decode_triton(q, kc, vc, table, lens.long(), qsl, 0.125, num_splits=2)
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, 1, 0.125)
    assert rel_err(out, ref) < TOL[torch.float32]


def counters_at_zero(device):
    return all(not c.any() for c in arrival._arrival_counters.get(device, []))


# 4 splits of a 64-long range, chunks of 16: lengths that use 1 split (5, 16), 2 (17), 3 (40)
# and all 4 (64); the row of length 50 is padding (no query row), so its splits must not count
FOLD_LENS, FOLD_Q_LENS = [5, 17, 64, 50, 16, 40], [1, 1, 1, 0, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_heads,n_kv", [(8, 2), (6, 2), (4, 4)])  # GQA 4, 3 (a ragged tile), 1
def test_decode_merge_by_last_split(dtype, n_heads, n_kv):
    """The last split program of each (sequence, kv head) merges that group's partials."""
    check(FOLD_LENS, FOLD_Q_LENS, n_heads, n_kv, 64, 8, dtype, num_splits=4, max_seq_len=64)
    assert counters_at_zero(torch.device("cpu"))


def test_decode_twice_is_bit_equal_and_leaves_counters_at_zero():
    """A graph replays the launch without re-zeroing the counters: each launch must reset them."""
    q, kc, vc, bt, lens, qsl = make_batch(FOLD_LENS, FOLD_Q_LENS, 8, 2, 64, 8, torch.float32)
    first = paged_decode_triton(q, kc, vc, bt, lens, qsl, 0.125, 64, num_splits=4)
    assert counters_at_zero(torch.device("cpu"))
    second = paged_decode_triton(q, kc, vc, bt, lens, qsl, 0.125, 64, num_splits=4)
    assert torch.equal(first, second)
    assert counters_at_zero(torch.device("cpu"))
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, 1, 0.125)
    assert rel_err(second, ref) < TOL[torch.float32]


def test_decode_merge_ignores_which_split_ends_last(shuffle_programs):
    """Groups interleaved and finishing in any order give the in-order result bit for bit."""
    q, kc, vc, bt, lens, qsl = make_batch(FOLD_LENS, FOLD_Q_LENS, 8, 2, 64, 8, torch.float16)
    args = (q, kc, vc, bt, lens, qsl, 0.125, 64)
    in_order = paged_decode_triton(*args, num_splits=4)
    shuffle_programs()
    for _ in range(4):
        assert torch.equal(paged_decode_triton(*args, num_splits=4), in_order)
        assert counters_at_zero(torch.device("cpu"))
    ref = paged_attention_ref(q, kc, vc, bt, lens, qsl, 1, 0.125)
    assert rel_err(in_order, ref) < TOL[torch.float16]


def test_decode_counters_grow_and_keep_old_buffers(monkeypatch):
    """A batch past the buffer gets a larger one; the old one stays (graphs hold its address)."""
    monkeypatch.setattr(arrival, "MIN_COUNTERS", 1)
    monkeypatch.setattr(arrival, "_arrival_counters", {})
    cpu = torch.device("cpu")
    small = arrival.arrival_counters(cpu, 4)
    assert arrival.arrival_counters(cpu, 3) is small
    check(FOLD_LENS, FOLD_Q_LENS, 8, 2, 64, 8, torch.float32, num_splits=4, max_seq_len=64)
    buffers = arrival._arrival_counters[cpu]
    assert buffers[0] is small and buffers[-1].numel() == len(FOLD_LENS) * 2
    assert counters_at_zero(cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_heads,n_kv", [(2, 2), (8, 2), (8, 1)])
@pytest.mark.parametrize("hd", [64, 128])
def test_prefill_matches_ref(dtype, n_heads, n_kv, hd):
    # fresh prompt, prompt extending a cached prefix (on and off block boundaries), one decode row
    check([20, 16 + 9, 7 + 18, 40], [20, 9, 18, 1], n_heads, n_kv, hd, 8, dtype)


def test_prefill_multiple_query_tiles():
    check([37, 50], [37, 21], 4, 2, 64, 16, torch.float16)  # > one 16-row tile per sequence


def test_ref_matches_sdpa_on_contiguous_cache():
    q, kc, vc, bt, lens, qsl = make_batch([13], [5], 4, 2, 16, 4, torch.float64)
    out = paged_attention_ref(q, kc, vc, bt, lens, qsl, 5, 0.3)
    k = kc[bt[0].long()].flatten(0, 1)[:13].repeat_interleave(2, 1).transpose(0, 1)
    v = vc[bt[0].long()].flatten(0, 1)[:13].repeat_interleave(2, 1).transpose(0, 1)
    mask = torch.ones(5, 13, dtype=torch.bool).tril(13 - 5)
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, want.transpose(0, 1))


def test_public_dispatch(monkeypatch):
    import importlib
    mod = importlib.import_module("kernels.attention")
    monkeypatch.setattr(mod, "paged_attention_triton", lambda *a: pytest.fail("Triton on CPU"))
    q, kc, vc, bt, lens, qsl = make_batch([9, 3], [1, 1], 4, 2, 16, 4, torch.float32)
    out = paged_attention(q, kc, vc, bt, lens, qsl, 1, 0.25)
    assert torch.equal(out, paged_attention_ref(q, kc, vc, bt, lens, qsl, 1, 0.25))


def new_tokens_for(q, bt, lens, qsl, block_size, n_kv, padding_row=None):
    """k and v rows for each query row, at its sequence's last position and the cache slot the
    block table gives it; padding_row marks that row as padding (slot -1)."""
    T, hd = q.shape[0], q.shape[2]
    rows = [b for b in range(len(lens)) if qsl[b + 1] > qsl[b]]
    pos = torch.tensor([int(lens[b]) - 1 for b in rows], dtype=torch.int32)
    slots = torch.tensor([int(bt[b, p // block_size]) * block_size + p % block_size
                          for b, p in zip(rows, pos.tolist())], dtype=torch.int32)
    if padding_row is not None:
        slots[padding_row] = -1
    kv = torch.randn(T, 2, n_kv, hd, dtype=q.dtype)  # k and v as strided views of one buffer
    cos, sin = rope_tables(hd, 128, 10000.0)
    return NewTokens(kv[:, 0], kv[:, 1], pos, slots, cos, sin)


def separately(q, kc, vc, new):
    """The unfused order: kernels.rotary's reference, then attention on the written cache."""
    q, kc, vc = q.clone(), kc.clone(), vc.clone()
    rotary_cache_write_ref(q, new.k, new.v, new.positions, new.cos, new.sin, kc, vc, new.slots)
    return q, kc, vc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_heads,n_kv", [(8, 2), (6, 2), (2, 2)])
@pytest.mark.parametrize("hd", [64, 128])
def test_decode_rotates_and_writes_new_tokens(dtype, n_heads, n_kv, hd):
    """The decode kernel given the step's k and v: the cache as the rotary reference writes it,
    the attention as the reference computes it over that cache. Row 2's slot is negative (a
    padding row): nothing is cached for it, and its output, which is discarded, is not checked."""
    q, kc, vc, bt, lens, qsl = make_batch(FOLD_LENS, FOLD_Q_LENS, n_heads, n_kv, hd, 8, dtype)
    new = new_tokens_for(q, bt, lens, qsl, 8, n_kv, padding_row=2)
    q_ref, kc_ref, vc_ref = separately(q, kc, vc, new)
    ref = paged_attention_ref(q_ref.double(), kc_ref.double(), vc_ref.double(), bt, lens, qsl, 1,
                              hd ** -0.5)
    out = paged_decode_triton(q, kc, vc, bt, lens, qsl, hd ** -0.5, 64, num_splits=4, new=new)
    real = [0, 1, 3, 4]
    assert rel_err(out[real], ref[real]) < TOL[dtype]
    assert rel_err(kc, kc_ref) < TOL[dtype] and torch.equal(vc, vc_ref)
    assert counters_at_zero(torch.device("cpu"))


def test_decode_with_new_tokens_against_rotary_kernel_then_decode(shuffle_programs):
    """Against the two launches it replaces (kernels.rotary's kernel, then decode): the same
    cache bit for bit, the same output up to where the new token is folded in (from registers,
    last, instead of inside its block), and that output bit-equal whatever the program order."""
    q, kc, vc, bt, lens, qsl = make_batch(FOLD_LENS, FOLD_Q_LENS, 8, 2, 64, 8, torch.float16)
    new = new_tokens_for(q, bt, lens, qsl, 8, 2)
    kc2, vc2, q2 = kc.clone(), vc.clone(), q.clone()
    rotary_cache_write_triton(q2, new.k, new.v, new.positions, new.cos, new.sin, kc2, vc2,
                              new.slots)
    unfused = paged_decode_triton(q2, kc2, vc2, bt, lens, qsl, 0.125, 64, num_splits=4)
    in_order = paged_decode_triton(q, kc.clone(), vc.clone(), bt, lens, qsl, 0.125, 64,
                                   num_splits=4, new=new)
    assert rel_err(in_order, unfused) < TOL[torch.float16]
    shuffle_programs()
    for _ in range(3):
        got_kc, got_vc = kc.clone(), vc.clone()
        got = paged_decode_triton(q, got_kc, got_vc, bt, lens, qsl, 0.125, 64, num_splits=4,
                                  new=new)
        assert torch.equal(got, in_order)
        assert torch.equal(got_kc, kc2) and torch.equal(got_vc, vc2)


@pytest.mark.parametrize("with_new", [False, True])
def test_decode_programs_take_several_chunks(monkeypatch, with_new):
    """Chunks of 4 over 64 positions and 4 programs: each program takes up to 4 chunks (split,
    split + 4, ...); lengths past max_seq_len are covered too."""
    monkeypatch.setattr(attention_decode, "INTERPRETED_CHUNK", 4)
    lens, q_lens = [5, 17, 64, 50, 16, 40, 90], [1, 1, 1, 0, 1, 1, 1]
    q, kc, vc, bt, lens_t, qsl = make_batch(lens, q_lens, 8, 2, 64, 8, torch.float32)
    new = new_tokens_for(q, bt, lens_t, qsl, 8, 2) if with_new else None
    q_ref, kc_ref, vc_ref = separately(q, kc, vc, new) if with_new else (q, kc, vc)
    ref = paged_attention_ref(q_ref, kc_ref, vc_ref, bt, lens_t, qsl, 1, 0.125)
    out = paged_decode_triton(q, kc, vc, bt, lens_t, qsl, 0.125, 64, num_splits=4, new=new)
    assert rel_err(out, ref) < TOL[torch.float32]
    assert counters_at_zero(torch.device("cpu"))


def test_public_attention_writes_new_tokens_on_every_path(monkeypatch):
    """paged_attention(new=...) on the CPU (reference) and through the Triton prefill path."""
    q, kc, vc, bt, lens, qsl = make_batch([9, 30], [3, 1], 4, 2, 64, 8, torch.float32)
    pos = torch.tensor([6, 7, 8, 29], dtype=torch.int32)
    seq = torch.tensor([0, 0, 0, 1])
    slots = (bt[seq, pos // 8] * 8 + pos % 8).to(torch.int32)
    cos, sin = rope_tables(64, 64, 10000.0)
    new = NewTokens(torch.randn(4, 2, 64), torch.randn(4, 2, 64), pos, slots, cos, sin)
    q_ref, kc_ref, vc_ref = separately(q, kc, vc, new)
    ref = paged_attention_ref(q_ref, kc_ref, vc_ref, bt, lens, qsl, 3, 0.125)
    for fn in (paged_attention, paged_attention_triton):
        got_kc, got_vc = kc.clone(), vc.clone()
        out = fn(q.clone(), got_kc, got_vc, bt, lens, qsl, 3, 0.125, None, new)
        assert rel_err(out, ref) < TOL[torch.float32]
        assert rel_err(got_kc, kc_ref) < TOL[torch.float32] and torch.equal(got_vc, vc_ref)
