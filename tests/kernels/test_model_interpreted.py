"""The whole engine through its Triton kernels, interpreted on the CPU: every op that runs a
kernel on a GPU runs it here (use_triton forced on, the weights in the GPU's [N, K] layout, no
CUDA graphs). Greedy tokens and logits against the PyTorch reference path: the kernels' own
tests check them one at a time, this checks how graph/llama.py wires them together."""
import pytest

import graph.llama
from api.inference import LlamaGenerator
from kernels import argmax, attention, gate_up_silu, linear, rmsnorm, rotary, silu_mul
from tests.helpers.tiny_models import make_hf_llama
from utils.hf_import import convert

KERNEL_MODULES = (argmax, attention, gate_up_silu, linear, rmsnorm, rotary, silu_mul)
PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8]  # <= 16 rows: prefill takes the decode GEMVs too


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("interpreted")
    make_hf_llama(path, hidden=64, intermediate=128, layers=3, n_heads=4, n_kv_heads=2, seed=4)
    return convert(str(path))


@pytest.fixture(scope="module")
def reference(model_dir):
    gen = LlamaGenerator(model_dir, device="cpu", cuda_graphs=False)
    return gen.generate_ids(PROMPT, 6), gen.logits(PROMPT)


def _run_kernels_on_the_cpu(monkeypatch):
    for module in KERNEL_MODULES:
        monkeypatch.setattr(module, "use_triton", lambda t: True)
    monkeypatch.setattr(graph.llama, "cpu_layout", lambda weight: weight)


def test_interpreted_kernels_give_the_reference_tokens(model_dir, reference, monkeypatch):
    _run_kernels_on_the_cpu(monkeypatch)
    gen = LlamaGenerator(model_dir, device="cpu", cuda_graphs=False)
    assert gen.model.layers[0]["attention.wqkv"].dim() == 2  # the kernels' layout, not the bmm's
    want_ids, want_logits = reference
    got = gen.logits(PROMPT)
    assert ((got - want_logits).norm() / want_logits.norm()).item() < 1e-5
    assert gen.generate_ids(PROMPT, 6) == want_ids
