"""kernels.pdl: which launches get programmatic dependent launch, and (compiled for sm_90 without
a GPU) where the PDL instructions land in the decode kernels."""
import json
import os
import subprocess
import sys

import pytest
import torch

from kernels import pdl

CUDA0 = torch.device("cuda", 0)
ON, OFF = {"PDL": True, "launch_pdl": True}, {"PDL": False}


@pytest.fixture
def hopper(monkeypatch):
    """A CUDA device 0 of compute capability 9, outside the interpreter, the switch unset."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LLAMA_TRITON_PDL", raising=False)
    monkeypatch.setattr(pdl, "_device_supports", lambda index: index == 0)


def test_on_unless_switched_off(hopper, monkeypatch):
    assert pdl.pdl_args(CUDA0) == ON
    monkeypatch.setenv("LLAMA_TRITON_PDL", "1")
    assert pdl.pdl_args(CUDA0) == ON
    monkeypatch.setenv("LLAMA_TRITON_PDL", "0")
    assert pdl.pdl_args(CUDA0) == OFF


def test_off_on_the_cpu_under_the_interpreter_and_before_hopper(hopper, monkeypatch):
    assert pdl.pdl_args(torch.device("cpu")) == OFF
    assert pdl.pdl_args(torch.device("cuda", 1)) == OFF  # "cc < 9"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.pdl_args(CUDA0) == OFF and not pdl.pdl_enabled(CUDA0)


def test_support_check_reads_the_compute_capability(monkeypatch):
    for major, want in ((8, False), (9, True), (10, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, m=major: (m, 0))
        assert pdl._device_supports.__wrapped__(0) is want  # the uncached function


def test_device_without_index_is_the_current_one(hopper, monkeypatch):
    monkeypatch.setenv("LLAMA_TRITON_PDL", "1")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert pdl.pdl_args(torch.device("cuda"))["PDL"]


@pytest.mark.parametrize("value", ["2", "on", "prefetch", "true"])
def test_unknown_mode_names_the_allowed_ones(monkeypatch, value):
    monkeypatch.setenv("LLAMA_TRITON_PDL", value)
    with pytest.raises(ValueError) as err:
        pdl.pdl_args(torch.device("cpu"))  # even where PDL could not run: a typo is a typo
    message = str(err.value)
    assert f"LLAMA_TRITON_PDL={value!r}" in message
    assert "'0', '1'" in message


# Compiles the decode kernels for sm_90 with PDL on, in a process
# without TRITON_INTERPRET, and prints for each the order of the instructions that matter.
_COMPILE_SM90 = r"""
import inspect, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import argmax, attention_decode, gate_up_silu, linear, rmsnorm, rotary

KEYS = {"griddepcontrol.wait": "wait", "griddepcontrol.launch_dependents": "release",
        "ld.global": "load", "cp.async.cg.shared.global": "load",
        "cp.async.ca.shared.global": "load", "st.global": "store"}
# a launch specialises pointers (16-byte aligned) and ints that are multiples of 16, as the
# model's N, K and strides are; only then does the pipeliner turn loads into cp.async
UNALIGNED = {"M", "M_BUCKET", "SPLIT_K"}

def pointer_roots(lines, pointers):
    # for each PTX register, the pointer arguments its value derives from
    sources = {}
    for line in lines:
        param = re.search(r"ld\.param\.\w+\s+(%\w+), \[\w+_param_(\d+)\]", line)
        if param:
            sources.setdefault(param.group(1), set()).add(int(param.group(2)))
            continue
        regs = re.findall(r"%\w+", line.split("//")[0])
        if regs and not re.search(r"\b(ld|st|atom|bar|bra|setp|cp)\.", line):
            sources.setdefault(regs[0], set()).update(regs[1:])
    def roots(reg, seen):
        found = set()
        for src in sources.get(reg, ()):
            if isinstance(src, int):
                found |= {pointers[src]} if src in pointers else set()
            elif src not in seen:
                seen.add(src)
                found |= roots(src, seen)
        return found
    return roots

def events(fn, sig, const, aligned=False, **opts):
    # the kernel's waits, releases, loads and stores in order; a load is named with the
    # pointer arguments its address derives from, e.g. "load:w_ptr"
    pointers = {i: n for i, n in enumerate(n for n in sig if n not in const)
                if sig[n].startswith("*")}
    attrs = {}
    if aligned:
        names = list(fn.arg_names)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if n not in const
                 and (sig[n].startswith("*") or sig[n] == "i32" and n not in UNALIGNED)}
    sig = {**sig, **{k: "constexpr" for k in const}}
    kernel = triton.compile(ASTSource(fn, sig, const, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"launch_pdl": True, **opts})
    lines = kernel.asm["ptx"].splitlines()
    roots = pointer_roots(lines, pointers)
    out = []
    for line in lines:
        for key, name in KEYS.items():
            if key in line:
                if name == "load":
                    # cp.async [shared], [global]: the global address is the last operand
                    address = re.findall(r"\[\s*(%\w+)", line)[-1]
                    name = ("load(async):" if key.startswith("cp.") else "load:") + "+".join(
                        sorted(roots(address, set())))
                out.append(name)
    return out

B = "*bf16"
gemv = dict(x_ptr=B, w_ptr=B, out_ptr=B, M="i32", N="i32", K="i32", M_BUCKET="i32", sxm="i32",
            swn="i32", som="i32")
rot = dict(q_ptr=B, k_ptr=B, v_ptr=B, pos_ptr="*i32", cos_ptr="*fp32", sin_ptr="*fp32",
           kc_ptr=B, vc_ptr=B, slot_ptr="*i32",
           **{a: "i32" for a in "sqt sqh skt skh svt svh s_cos kcb kcr kch vcb vcr vch "
              "block_size NQ NKV HALF".split()})
out = {}
splitk = dict(x_ptr=B, w_ptr=B, part_ptr="*fp32", out_ptr=B, counter_ptr="*i32", M="i32",
              N="i32", K="i32", M_BUCKET="i32", SPLIT_K="i32", K_PER_SPLIT="i32", sxm="i32",
              swn="i32", som="i32")
lin, gus, spk = (linear._decode_linear_kernel, gate_up_silu._decode_gate_up_silu_kernel,
                 linear._decode_splitk_kernel)
EVEN = {"EVEN_K": True}
for name, kern, fn, sig, extra in (
        ("linear", lin, lin.fn, gemv, {}),
        ("gate_up_silu", gus, gus.fn, gemv, {}),
        ("splitk", spk, spk.fn.fn, splitk, {**EVEN, "SUM": True}),
        ("splitk, summed later", spk, spk.fn.fn, splitk, {**EVEN, "SUM": False})):
    for cfg in (kern.configs[0], kern.configs[-1]):
        const = dict(DOT_PREC="tf32", PDL=True, **extra, **cfg.kwargs)
        for aligned in (False, True):
            out[f"{name} {cfg.kwargs}{', aligned' * aligned}"] = events(
                fn, sig, const, aligned, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
for parts, x_type in ((0, B), (4, "*fp32")):
    out[f"rmsnorm, {parts} partials"] = events(
        rmsnorm._rmsnorm_kernel.fn,
        dict(x_ptr=x_type, r_ptr=B, w_ptr=B, out_ptr=B, s_ptr=B, H="i32", sx="i32", sr="i32",
             so="i32", ss="i32", s_part="i32", eps="fp32"),
        dict(HAS_RES=True, N_PARTS=parts, PDL=True, BLOCK=2048), num_warps=8)
# decode attention: its merge reads partials after the release, so it is checked apart
attn = attention_decode._decode_split_kernel
FP32 = ("po_ptr", "plse_ptr", "cos_ptr", "sin_ptr")
BF16 = ("q_ptr", "kc_ptr", "vc_ptr", "out_ptr", "k_ptr", "v_ptr")
attention = {}
for new_kv in (False, True):
    const = dict(BLOCK_H=16, BLOCK_D=64, BLOCK_N=64, SPLIT=True, DOT_PREC="tf32",
                 NEW_KV=new_kv, PDL=True)
    sig = {n: ("*fp32" if n in FP32 else B if n in BF16 else "*i32") if n.endswith("_ptr")
           else "fp32" if n == "scale_log2" else "i32"
           for n in inspect.signature(attn.fn.fn).parameters if n not in const}
    attention[f"new_kv={new_kv}"] = events(attn.fn, sig, const)
print(json.dumps(attention))
out["rotary"] = events(rotary._rotary_cache_kernel, rot,
                       dict(BLOCK_HQ=32, BLOCK_HKV=8, BLOCK_D=32, PDL=True))
out["chunk argmax"] = events(argmax._chunk_argmax_kernel,
                             dict(x_ptr="*fp32", val_ptr="*fp32", idx_ptr="*i32", V="i32",
                                  sx="i32", n_chunks="i32"), dict(BLOCK=4096, PDL=True))
out["merge argmax"] = events(argmax._merge_argmax_kernel,
                             dict(val_ptr="*fp32", idx_ptr="*i32", out_ptr="*i64",
                                  n_chunks="i32"), dict(BLOCK_C=32, PDL=True))
print(json.dumps(out))
"""


def test_pdl_kernels_compile_for_sm90_in_the_right_order(tmp_path):
    """Without a GPU the gdc calls are only checked here: each kernel compiles (through ptxas),
    nothing is stored before the wait, and nothing loaded before it but what the decode attention
    may read early (each load traced back to the pointer arguments its address comes from); the
    release comes after the last main-loop load and before the first store. The GEMVs are checked
    twice: as odd sizes compile (plain loads) and as model shapes do, with pointers and sizes
    specialised as a launch would, where their loads become the pipeline's cp.async copies."""
    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", _COMPILE_SM90], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    attention, kernels = (json.loads(line) for line in run.stdout.strip().splitlines()[-2:])
    for name, ev in attention.items():
        assert ev.count("wait") == 1 and ev.count("release") == 1, name
        wait = ev.index("wait")
        assert "store" not in ev[:wait], name
        early = set(ev[:wait]) - {"wait"}
        if name == "new_kv=True":
            # graph inputs, rotary tables and the older cache rows before the wait; never q,
            # k and v, which the QKV GEMV before writes
            readable = {"qsl_ptr", "lens_ptr", "table_ptr", "kc_ptr", "vc_ptr", "pos_ptr",
                        "slot_ptr", "cos_ptr", "sin_ptr"}
            roots = {r for e in early for r in e.split(":")[1].split("+")}
            assert {"kc_ptr", "vc_ptr"} <= roots <= readable, roots
            assert any(e.startswith("load") and "q_ptr" in e for e in ev[wait:]), name
        else:
            assert not early, early  # the kernel before may have written the cache
    assert len(kernels) == 21
    # specialised as a launch on model shapes is, the GEMVs stream their weights through cp.async
    # (the software pipeline); the ld.global form is what odd sizes compile to
    for name, ev in kernels.items():
        assert any(e.startswith("load(async):") for e in ev) == name.endswith("aligned"), name
    for name, ev in kernels.items():
        assert ev.count("wait") == 1 and ev.count("release") == 1, name
        wait, release = ev.index("wait"), ev.index("release")
        loads = [i for i, e in enumerate(ev) if e.startswith("load")]
        assert loads[0] > wait, (name, ev)
        # split-K's last program reads the partials after the release, as attention's merge does
        main_loads = [i for i in loads if "part_ptr" not in ev[i]]
        assert main_loads[-1] < release < ev.index("store"), (name, ev)
        assert not any(e.endswith(":") for e in ev), (name, "a load whose address was not traced")
