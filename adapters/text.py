"""Backend-neutral text streaming helpers: incremental UTF-8 decoding and stop strings."""
from __future__ import annotations

import codecs

__all__ = ["StopBuffer", "Utf8Stream"]


class Utf8Stream:
    """Turns token byte pieces into text without ever splitting a multi-byte character."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, piece: bytes) -> str:
        return self._decoder.decode(piece)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopBuffer:
    """Cuts the stream at the first stop string and holds back text that may begin one,
    so a stop string is never sent to the client, even when it spans several tokens."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Add text; return (text safe to send now, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            emit, self._pending = self._pending[:cut], ""
            return emit, True
        hold = self._held_suffix()
        emit = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(emit):]
        return emit, False

    def flush(self) -> str:
        """The held-back text, at the end of a sequence that hit no stop string."""
        rest, self._pending = self._pending, ""
        return rest

    def _held_suffix(self) -> int:
        longest = max(len(s) for s in self._stops) - 1
        for k in range(min(longest, len(self._pending)), 0, -1):
            tail = self._pending[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
