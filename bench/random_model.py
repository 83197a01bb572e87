"""A model of a given shape with random weights, built straight on the device."""
from __future__ import annotations

import torch

from graph.config import LlamaConfig
from utils.checkpoint import expected_shapes


def random_state_dict(config: LlamaConfig, device, dtype=torch.bfloat16, seed: int = 0):
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            t = torch.empty(shape, device=device, dtype=dtype)
            state[name] = t.normal_(0.0, 0.02, generator=generator)
    return state


def weight_bytes(config: LlamaConfig, dtype=torch.bfloat16) -> int:
    size = torch.empty(0, dtype=dtype).element_size()
    return sum(torch.Size(s).numel() for s in expected_shapes(config).values()) * size
