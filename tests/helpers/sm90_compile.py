"""Compiling a Gluon kernel for a Hopper GPU on a machine without one (triton's ptxas), in a
subprocess so that TRITON_INTERPRET, which the test session sets, is left out, and counting the
PTX instructions that show the kernel's design (TMA loads, mbarriers, register split, atomics)."""
import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import importlib, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

module, kernel, types, const = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(module), kernel)
names = list(fn.arg_names)
layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=2)
desc = f"tensordesc<bf16[{const['BN']}, {const['BK']}],{layout!r}>"
sig = {n: desc if n.endswith("_desc") else types.get(n, "constexpr") for n in names}
attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*")}
compiled = triton.compile(GluonASTSource(fn, sig, const, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": const["num_warps"]})
ptx = compiled.asm["ptx"]
count = lambda pattern: len(re.findall(pattern, ptx))
print(json.dumps({"tma loads": count(r"cp\.async\.bulk\.tensor\.2d"),
                  "slot waits": count(r"mbarrier\.try_wait"),
                  "slot releases": count(r"mbarrier\.arrive"),
                  "register split": count(r"setmaxnreg"),
                  # triton 3.9 lowers an unused atomic result to red, a read-only one to ld
                  "acquire": count(r"(atom|ld)\.global\.gpu\.acquire"),
                  "release": count(r"(atom|red)\.global\.gpu\.(release|acq_rel)"),
                  "f32 atomic adds": count(r"(atom|red)\.global\.gpu\.relaxed\.add\.f32"),
                  "L2-only loads": count(r"ld\.global\.cg"),
                  "shared": compiled.metadata.shared}))
"""


def compile_for_sm90(tmp_path, module: str, kernel: str, types: dict, const: dict) -> dict:
    """`types`: the non-constexpr arguments' triton types ("*fp32", "i32", ...); descriptor
    arguments (named *_desc) are bf16 [BN, BK] tiles. Returns the PTX counts."""
    pytest.importorskip("triton.backends.nvidia")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-c", _SCRIPT,
                          json.dumps([module, kernel, types, const])],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
