"""Streaming text with stop strings: emit text as it comes, but hold back a tail that could be
the start of a stop string, and cut at the first stop string found."""
from __future__ import annotations


class StopTextFilter:
    def __init__(self, stop: list[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add decoded text; return what may be shown now."""
        if self.stopped:
            return ""
        self.pending += piece
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            shown, self.pending = self.pending[:cut], ""
            return shown
        keep = self._held_back_length()
        shown = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return shown

    def _held_back_length(self) -> int:
        """Length of the longest tail of pending text that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        shown, self.pending = ("" if self.stopped else self.pending), ""
        return shown
