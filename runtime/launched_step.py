"""A decode step whose greedy tokens the host has not read yet.

The scheduler launches decode step N+1 before it reads the tokens of step N, so the host's
bookkeeping for one step overlaps the device's work on the other. Step N+1 takes its input
tokens straight from step N's output on the device, and the host reads step N's tokens
afterwards: on CUDA through a pinned copy queued behind the step (runtime/token_readback.py),
elsewhere directly, since there every step has finished when its launch returns.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class LaunchedStep:
    def __init__(self, tokens: torch.Tensor, read: Callable[[], list[int]] | None = None):
        self.tokens = tokens              # greedy tokens [B], on the device that made them
        self._read = read or tokens.tolist

    def select(self, rows: list[int]) -> torch.Tensor:
        """The tokens of these rows, on the device, as the input ids of a following step."""
        if rows == list(range(len(rows))):   # most steps: the same sequences, or a prefix
            return self.tokens[:len(rows)]
        return self.tokens.index_select(0, torch.tensor(rows, device=self.tokens.device))

    def read(self) -> list[int]:
        """The tokens on the host; waits for this step (not for steps queued after it)."""
        return self._read()
