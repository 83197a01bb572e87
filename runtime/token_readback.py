"""Greedy tokens copied into pinned host memory behind the step that made them.

`tensor.tolist()` on a CUDA tensor waits for everything queued on the device, including a step
launched after this one. A non-blocking copy into pinned memory plus an event waits for this
step alone. Two slots: the scheduler holds at most two launched steps at once (the one it reads
and the one launched ahead of it), so a slot is free again by the time it comes round.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

SLOTS = 2


class TokenReadback:
    def __init__(self, device: torch.device, rows: int = 256):
        self.device = device
        self.host = torch.empty((SLOTS, rows), dtype=torch.int64).pin_memory()
        self.events = [torch.cuda.Event() for _ in range(SLOTS)]
        self.slot = 0

    def start(self, tokens: torch.Tensor) -> Callable[[], list[int]]:
        """Queue the copy of tokens [B] (int64, on self.device); returns the reader."""
        n = tokens.shape[0]
        if n > self.host.shape[1]:
            for event in self.events:
                event.synchronize()
            self.host = torch.empty((SLOTS, n), dtype=torch.int64).pin_memory()
        slot, self.slot = self.slot, (self.slot + 1) % SLOTS
        self.host[slot, :n].copy_(tokens, non_blocking=True)
        event = self.events[slot]
        event.record(torch.cuda.current_stream(self.device))
        host = self.host[slot, :n]

        def read() -> list[int]:
            event.synchronize()
            return host.tolist()
        return read
