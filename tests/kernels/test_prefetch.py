import pytest
import torch
import triton
import triton.language as tl

from conftest import rel_err
from kernels import prefetch
from kernels.attention_decode import paged_decode_triton
from kernels.rmsnorm import rmsnorm_ref, rmsnorm_triton
from test_attention import make_batch


def test_prefetch_is_off_on_the_cpu_under_the_interpreter_and_when_switched_off(monkeypatch):
    monkeypatch.setattr(prefetch, "_device_supports", lambda index: True)
    monkeypatch.delenv("LLAMA_TRITON_PREFETCH", raising=False)
    assert not prefetch.prefetch_enabled(torch.device("cpu"))
    assert not prefetch.prefetch_enabled(torch.device("cuda", 0))  # TRITON_INTERPRET=1 here
    monkeypatch.delenv("TRITON_INTERPRET")
    assert prefetch.prefetch_enabled(torch.device("cuda", 0))
    monkeypatch.setenv("LLAMA_TRITON_PREFETCH", "0")
    assert not prefetch.prefetch_enabled(torch.device("cuda", 0))
    assert prefetch.prefetch_lines(None) == 0


@triton.jit
def _mark_line(ptrs):
    tl.store(ptrs, 0)  # stands in for the prefetch: zeroes the first byte of each line asked for


@pytest.fixture
def marked_lines(monkeypatch):
    """Prefetch switched on under the interpreter, each prefetched line marked in a 0xFF buffer
    of 40 lines of which the first 11 (and 5 bytes) are worth prefetching; returns the buffer
    and a check that exactly the first 12 lines were asked for."""
    monkeypatch.setattr(prefetch, "prefetch_enabled", lambda device: True)
    monkeypatch.setattr(prefetch, "prefetch_l2", _mark_line)
    monkeypatch.setattr(prefetch, "MAX_BYTES", 11 * prefetch.LINE + 5)
    monkeypatch.setattr(prefetch, "LINES_PER_PROGRAM", 3)  # 4 programs, the last short
    weight = torch.full((40, prefetch.LINE), 255, dtype=torch.uint8)

    def asked_for():
        first_bytes = weight[:, 0] == 0
        return first_bytes.nonzero().flatten().tolist() == list(range(12)) and \
            (weight[:, 1:] == 255).all()
    return weight, asked_for


def test_rmsnorm_programs_past_the_rows_prefetch_every_line_once(marked_lines):
    weight, asked_for = marked_lines
    x, r, w = torch.randn(3, 64), torch.randn(3, 64), torch.randn(64)
    out, s = rmsnorm_triton(x, w, 1e-5, r, prefetch=weight)
    want, want_s = rmsnorm_ref(x, w, 1e-5, r)
    assert rel_err(out, want) < 1e-5 and torch.equal(s, want_s)
    assert asked_for()


def test_rmsnorm_prefetches_only_at_decode(marked_lines):
    weight, _ = marked_lines
    rmsnorm_triton(torch.randn(17, 64), torch.randn(64), 1e-5, prefetch=weight)
    assert (weight == 255).all()


def test_decode_attention_programs_share_the_prefetch(marked_lines):
    weight, asked_for = marked_lines
    q, kc, vc, bt, lens, qsl = make_batch([5, 17, 40], [1, 1, 1], 4, 2, 64, 8, torch.float32)
    out = paged_decode_triton(q, kc, vc, bt, lens, qsl, 0.125, 64, num_splits=4, prefetch=weight)
    assert torch.equal(out, paged_decode_triton(q, kc, vc, bt, lens, qsl, 0.125, 64,
                                                num_splits=4))
    assert asked_for()
