import torch

from kernels import pdl


def test_pdl_is_off_on_the_cpu_and_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(pdl, "_device_supports", lambda index: True)
    monkeypatch.delenv("LLAMA_TRITON_PDL", raising=False)
    assert pdl.pdl_args(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.pdl_enabled(torch.device("cuda", 0))


def test_pdl_follows_the_device_and_the_switch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("LLAMA_TRITON_PDL", raising=False)
    monkeypatch.setattr(pdl, "_device_supports", lambda index: index == 0)
    assert pdl.pdl_args(torch.device("cuda", 0)) == {"PDL": True, "launch_pdl": True}
    assert not pdl.pdl_enabled(torch.device("cuda", 1))   # e.g. a pre-Hopper GPU
    monkeypatch.setenv("LLAMA_TRITON_PDL", "0")
    assert not pdl.pdl_enabled(torch.device("cuda", 0))
