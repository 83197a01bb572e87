from types import SimpleNamespace

import pytest
import torch

from kernels.dispatch import use_triton


@pytest.mark.parametrize("backend,is_cuda,want", [
    (None, True, True), ("triton", True, True), ("torch", True, False),
    (None, False, False), ("triton", False, False),
])
def test_use_triton_reads_backend_at_call_time(monkeypatch, backend, is_cuda, want):
    if backend is None:
        monkeypatch.delenv("LLAMA_TRITON_BACKEND", raising=False)
    else:
        monkeypatch.setenv("LLAMA_TRITON_BACKEND", backend)
    assert use_triton(SimpleNamespace(is_cuda=is_cuda)) is want


def test_cpu_tensor_never_uses_triton():
    assert not use_triton(torch.randn(2))
