"""Cut streamed text at the first stop string, across arbitrary chunk boundaries."""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Filters a text stream, ending it where any stop string first completes.

    Text that might be the start of a stop string is held back until it is
    known either to complete a stop (then it and everything after it are
    dropped) or not to (then it is released, in order). The stop that
    completes first in the stream wins (earliest end; on a tie, the one that
    starts earliest), so the result does not depend on how text is chunked.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        """stops: stop strings; empty strings are ignored."""
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._held = ""
        self.stopped = False

    def add(self, text: str) -> tuple[str, bool]:
        """Feed a chunk; return (text safe to emit now, whether a stop was hit).

        After a stop every further call returns ("", True).
        """
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._held + text
        cut = self._first_match(buffer)
        if cut is not None:
            self._held, self.stopped = "", True
            return buffer[:cut], True
        keep = self._pending_length(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """End of stream without a stop: return the held-back text."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str) -> int | None:
        """Start index of the stop that completes first in `buffer`, or None."""
        best: tuple[int, int] | None = None
        for stop in self._stops:
            start = buffer.find(stop)
            if start >= 0:
                key = (start + len(stop), start)
                best = key if best is None else min(best, key)
        return None if best is None else best[1]

    def _pending_length(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop."""
        longest = max(len(s) for s in self._stops) - 1
        for size in range(min(longest, len(buffer)), 0, -1):
            tail = buffer[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
