import pytest
import torch

from kernels.argmax import argmax, argmax_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,V,block", [(1, 1000, 128), (3, 5000, 1024), (2, 37, 4096)])
def test_argmax_triton_matches_torch(dtype, B, V, block):
    logits = torch.randn(B, V).to(dtype)
    out = argmax_triton(logits, block=block)
    assert out.dtype == torch.int64
    assert torch.equal(out, torch.argmax(logits, dim=-1))


def test_argmax_ties_go_to_first_index_across_chunks():
    logits = torch.randn(2, 600)
    logits[0, [150, 300, 599]] = 50.0  # ties in different chunks of 128
    logits[1, [5, 6]] = 50.0  # ties inside one chunk
    assert argmax_triton(logits, block=128).tolist() == [150, 5]


def test_argmax_public_on_cpu():
    logits = torch.randn(3, 50)
    assert torch.equal(argmax(logits), torch.argmax(logits, -1))
