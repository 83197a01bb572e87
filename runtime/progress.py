"""A one-line progress bar for long batch jobs: finished requests and generated tokens/s, redrawn
in place on stderr. Off unless stderr is a terminal, so logs and pipes never fill with it."""
from __future__ import annotations

import sys
import time

MIN_REQUESTS = 8     # fewer requests finish before a bar would tell anything
WIDTH = 30


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:   # a closed stream
        return False


class ProgressBar:
    def __init__(self, total: int, stream=None, enabled: bool | None = None,
                 min_interval: float = 0.1, clock=time.monotonic):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = total >= MIN_REQUESTS and is_terminal(self.stream)
        self.enabled = enabled
        self.clock, self.min_interval = clock, min_interval
        self.start = self.last_draw = clock()
        self.done = self.tokens = 0

    def update(self, done: int, new_tokens: int) -> None:
        """done: requests finished so far; new_tokens: tokens generated since the last call."""
        self.done, self.tokens = done, self.tokens + new_tokens
        now = self.clock()
        if self.enabled and (now - self.last_draw >= self.min_interval or done == self.total):
            self.last_draw = now
            self.stream.write("\r" + self.line(now))
            self.stream.flush()

    def line(self, now: float) -> str:
        filled = WIDTH * self.done // max(self.total, 1)
        rate = self.tokens / max(now - self.start, 1e-9)
        return (f"[{'=' * filled}{' ' * (WIDTH - filled)}] {self.done}/{self.total} requests, "
                f"{self.tokens} tokens, {rate:,.0f} tok/s")

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line(self.clock()) + "\n")
            self.stream.flush()
