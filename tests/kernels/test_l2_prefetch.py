"""kernels.l2_prefetch: when the decode kernels ask L2 for the next GEMV's weights, which chunks
each program asks for (the interpreter, with the inline PTX replaced by a counter), that asking
changes no result, and (compiled for sm_90 without a GPU) where the instruction lands."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl

from conftest import TOL, rel_err
from kernels import attention_decode, gate_up_silu, l2_prefetch, rmsnorm
from kernels.l2_prefetch import CHUNK, ISSUERS, prefetch_chunks

CUDA0 = torch.device("cuda", 0)


def fake_weight(nbytes, device=CUDA0, address=1 << 20):
    """What prefetch_chunks reads of a weight, for a CUDA tensor this machine cannot make."""
    return SimpleNamespace(device=device, numel=lambda: nbytes // 2, element_size=lambda: 2,
                           data_ptr=lambda: address)


@pytest.fixture
def hopper(monkeypatch):
    """Compute capability 9 on device 0, outside the interpreter, the variables unset."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in ("LLAMA_TRITON_L2_PREFETCH_MB", "LLAMA_TRITON_L2_PREFETCH_SITES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(l2_prefetch, "_device_supports", lambda index: index == 0)


def test_off_unless_a_cap_is_set(hopper, monkeypatch):
    weight = fake_weight(3 << 20)
    assert prefetch_chunks(weight, "norm") == 0
    monkeypatch.setenv("LLAMA_TRITON_L2_PREFETCH_MB", "1")
    assert prefetch_chunks(weight, "norm") == (1 << 20) // CHUNK  # capped
    monkeypatch.setenv("LLAMA_TRITON_L2_PREFETCH_MB", "8")
    assert prefetch_chunks(weight, "attention") == (3 << 20) // CHUNK  # the whole weight
    # only whole chunks inside the tensor
    assert prefetch_chunks(fake_weight(CHUNK * 5 + 48), "gate_up") == 5
    assert prefetch_chunks(fake_weight(CHUNK - 16), "gate_up") == 0


def test_off_where_it_cannot_run(hopper, monkeypatch):
    monkeypatch.setenv("LLAMA_TRITON_L2_PREFETCH_MB", "8")
    assert prefetch_chunks(None, "norm") == 0
    assert prefetch_chunks(fake_weight(1 << 20, torch.device("cpu")), "norm") == 0
    assert prefetch_chunks(fake_weight(1 << 20, torch.device("cuda", 1)), "norm") == 0  # cc < 9
    assert prefetch_chunks(fake_weight(1 << 20, address=(1 << 20) + 8), "norm") == 0  # unaligned
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert prefetch_chunks(fake_weight(1 << 20), "norm") == 0


def test_sites_pick_the_kernels_that_ask(hopper, monkeypatch):
    monkeypatch.setenv("LLAMA_TRITON_L2_PREFETCH_MB", "8")
    monkeypatch.setenv("LLAMA_TRITON_L2_PREFETCH_SITES", "attention,gate_up")
    weight = fake_weight(1 << 20)
    assert prefetch_chunks(weight, "norm") == 0
    assert prefetch_chunks(weight, "attention") == prefetch_chunks(weight, "gate_up") == 64


def test_support_check_reads_the_compute_capability(monkeypatch):
    for major, want in ((8, False), (9, True), (10, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, m=major: (m, 0))
        assert l2_prefetch._device_supports.__wrapped__(0) is want  # the uncached function


@pytest.mark.parametrize("value", ["-1", "1.5", "lots", ""])
def test_a_cap_that_is_not_whole_megabytes_is_named(hopper, monkeypatch, value):
    monkeypatch.setenv("LLAMA_TRITON_L2_PREFETCH_MB", value)
    with pytest.raises(ValueError) as err:
        prefetch_chunks(fake_weight(1 << 20), "norm")
    assert f"LLAMA_TRITON_L2_PREFETCH_MB={value!r} is not a whole number of MB" in str(err.value)


def test_an_unknown_site_is_named(hopper, monkeypatch):
    monkeypatch.setenv("LLAMA_TRITON_L2_PREFETCH_MB", "8")
    monkeypatch.setenv("LLAMA_TRITON_L2_PREFETCH_SITES", "norm,wo")
    with pytest.raises(ValueError) as err:
        prefetch_chunks(fake_weight(1 << 20), "norm")
    assert "['wo'] is not among attention, norm, gate_up" in str(err.value)


def test_extra_programs_are_one_wave_at_most():
    cpu = torch.device("cpu")  # the interpreter's 4 SMs
    assert l2_prefetch.extra_programs(0, cpu) == 0
    assert l2_prefetch.extra_programs(1, cpu) == 1
    assert l2_prefetch.extra_programs(l2_prefetch.CHUNKS_PER_EXTRA_PROGRAM + 1, cpu) == 2
    assert l2_prefetch.extra_programs(10 ** 6, cpu) == 4


@triton.jit
def _count_round(base, first, end):
    # the interpreter has no inline PTX: count each chunk _prefetch_round would ask for, at the
    # int32 that starts it
    chunk = first + tl.arange(0, 32)
    counts = base.to(tl.pointer_type(tl.int32), bitcast=True)
    tl.atomic_add(counts + chunk.to(tl.int64) * (16384 // 4), 1, mask=chunk < end)


@pytest.fixture
def counted(monkeypatch):
    """Kernels ask for `n` chunks of whatever weight they are given, and each ask is counted."""
    assert ISSUERS == 32 and CHUNK == 16384  # as _count_round has them
    monkeypatch.setattr(l2_prefetch, "_prefetch_round", _count_round)

    def ask_for(n):
        for module in (rmsnorm, attention_decode, gate_up_silu):
            monkeypatch.setattr(module, "prefetch_chunks", lambda weight, site: n)
        return torch.zeros(n * CHUNK // 4, dtype=torch.int32)

    return ask_for


def asked_once_each(target, n):
    starts = target.view(n, CHUNK // 4)
    return bool((starts[:, 0] == 1).all() and (starts[:, 1:] == 0).all())


@triton.jit
def _share_kernel(base, n_chunks):
    l2_prefetch.prefetch_share(base, n_chunks, tl.program_id(0), tl.num_programs(0))


@pytest.mark.parametrize("n,programs", [(1, 1), (31, 3), (100, 7), (70, 64), (5, 9)])
def test_shares_cover_every_chunk_once(counted, n, programs):
    target = counted(n)
    _share_kernel[(programs,)](target, n)
    assert asked_once_each(target, n)


def test_rmsnorm_programs_added_to_ask_change_nothing(counted):
    x, r, w = torch.randn(3, 200), torch.randn(3, 200), torch.randn(200)
    plain = rmsnorm.rmsnorm_triton(x, w, 1e-5, r)
    n = 3 * l2_prefetch.CHUNKS_PER_EXTRA_PROGRAM + 5  # four extra programs of the interpreter's 4
    target = counted(n)
    asked = rmsnorm.rmsnorm_triton(x, w, 1e-5, r, prefetch=target)
    assert all(torch.equal(a, b) for a, b in zip(asked, plain))
    assert asked_once_each(target, n)


@pytest.mark.parametrize("with_new", [False, True])
def test_decode_attention_programs_ask_and_change_nothing(counted, with_new):
    from test_attention import make_batch, new_tokens_for
    q, kc, vc, bt, lens, qsl = make_batch([9, 40, 3], [1, 1, 1], 4, 2, 64, 8, torch.float32)
    new = new_tokens_for(q, bt, lens, qsl, 8, 2) if with_new else None

    def run(prefetch):
        caches = kc.clone(), vc.clone()
        q_in = q.clone()
        out = attention_decode.paged_decode_triton(q_in, *caches, bt, lens, qsl, 64 ** -0.5, 64,
                                                   num_splits=3, new=new, prefetch=prefetch)
        return out, *caches

    plain = run(None)
    target = counted(50)
    asked = run(target)
    assert all(torch.equal(a, b) for a, b in zip(asked, plain))
    assert asked_once_each(target, 50)


def test_gate_up_programs_ask_for_w2_and_change_nothing(counted):
    x, w13 = torch.randn(2, 64), torch.randn(400, 64) / 8
    plain = gate_up_silu.gate_up_silu_triton(x, w13)
    target = counted(37)
    asked = gate_up_silu.gate_up_silu_triton(x, w13, prefetch=target)
    assert torch.equal(asked, plain)
    assert rel_err(asked, gate_up_silu.gate_up_silu_ref(x.double(), w13.double())) < TOL[x.dtype]
    assert asked_once_each(target, 37)


# Compiles the three kernels that ask for sm_90 with PDL on, in a process without
# TRITON_INTERPRET, and prints, for each, the order of its prefetches and PDL instructions.
_COMPILE_SM90 = r"""
import inspect, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import attention_decode, gate_up_silu, rmsnorm

KEYS = {"cp.async.bulk.prefetch.L2.global": "prefetch", "griddepcontrol.wait": "wait",
        "griddepcontrol.launch_dependents": "release"}

FP32 = ("po_ptr", "plse_ptr", "cos_ptr", "sin_ptr")  # decode attention's float32 buffers
INT32 = ("table_ptr", "lens_ptr", "qsl_ptr", "counter_ptr", "pos_ptr", "slot_ptr")

def pointer(name):
    return "*fp32" if name in FP32 else "*i32" if name in INT32 else "*bf16"

def events(fn, const, num_warps=4):
    params = [n for n in inspect.signature(fn.fn).parameters if n not in const]
    sig = {n: (pointer(n) if n.endswith("_ptr") else "fp32" if n in ("eps", "scale_log2")
               else "i32") for n in params}
    sig.update({k: "constexpr" for k in const})
    kernel = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32),
                            options={"launch_pdl": True, "num_warps": num_warps})
    return [name for line in kernel.asm["ptx"].splitlines()
            for key, name in KEYS.items() if key in line]

out = {}
for prefetch in (False, True):
    for new_kv in (False, True):
        out[f"attention new_kv={new_kv} prefetch={prefetch}"] = events(
            attention_decode._decode_split_kernel.fn,
            dict(BLOCK_H=16, BLOCK_D=64, BLOCK_N=64, SPLIT=True, DOT_PREC="tf32", NEW_KV=new_kv,
                 PDL=True, PREFETCH=prefetch))
    out[f"rmsnorm prefetch={prefetch}"] = events(
        rmsnorm._rmsnorm_kernel.fn,
        dict(HAS_RES=True, N_PARTS=0, PDL=True, PREFETCH=prefetch, BLOCK=2048), num_warps=8)
    out[f"gate_up prefetch={prefetch}"] = events(
        gate_up_silu._decode_gate_up_silu_kernel.fn,
        dict(DOT_PREC="tf32", PDL=True, PREFETCH=prefetch, BLOCK_N=64, BLOCK_K=128))
print(json.dumps(out))
"""


def test_prefetch_compiles_for_sm90_where_each_kernel_should_ask(tmp_path):
    """Through ptxas: attention asks before its PDL wait (while the QKV GEMV drains), the gate+up
    GEMV after its release (its last weight load issued), and nothing asks when switched off."""
    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", _COMPILE_SM90], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    kernels = json.loads(run.stdout.strip().splitlines()[-1])
    for name, ev in kernels.items():
        assert ("prefetch" in ev) == name.endswith("prefetch=True"), (name, ev)
        assert ev.count("wait") == 1 and ev.count("release") == 1, (name, ev)
        if name.startswith("attention") and "prefetch" in ev:
            assert ev.index("prefetch") < ev.index("wait"), (name, ev)
        if name.startswith("gate_up") and "prefetch" in ev:
            assert ev.index("release") < ev.index("prefetch"), (name, ev)
