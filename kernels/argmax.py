"""Greedy sampling on the device: argmax over the vocabulary of each row."""
import torch

from .dispatch import use_triton


def argmax_ref(logits):
    return torch.argmax(logits, dim=-1)


def argmax_triton(logits):
    return argmax_ref(logits)


def argmax(logits):
    """logits [B, V] -> int64 [B]."""
    if use_triton(logits):
        return argmax_triton(logits)
    return argmax_ref(logits)
