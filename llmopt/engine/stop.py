"""Stop strings on streamed text: never emit any part of a stop string.

Text that could be the start of a stop string is held back until the next delta
shows whether it is one.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add generated text; return what is safe to show. Sets `stopped` on a match."""
        if not self.stops:
            return delta
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = self._held_suffix()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def _held_suffix(self) -> int:
        """Length of the longest suffix of pending that begins some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
