"""Backend-neutral text streaming helpers: incremental UTF-8 decoding, stop strings, and the Deltas
a local decode loop yields from them."""
from __future__ import annotations

import codecs

from adapters.base import Delta, TokenLogprob, Usage

__all__ = ["DeltaEmitter", "StopBuffer", "Utf8Stream"]


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


class DeltaEmitter:
    """The per-token tail of a local decode loop: token bytes -> UTF-8 text -> stop strings -> Deltas. A token's
    logprob rides on the Delta that first shows text (a token may end mid-character or inside a held stop)."""

    def __init__(self, stops: list[str]) -> None:
        self._utf8, self._stops = Utf8Stream(), StopBuffer(stops)
        self._logprobs: list[TokenLogprob] = []
        self.produced = 0  # tokens pushed: the usage's completion_tokens
        self.stopped = False  # a stop string was hit: the loop must end

    def push(self, piece: bytes, logprob: TokenLogprob | None = None) -> Delta | None:
        """One generated token; a Delta when there is text to send now."""
        self.produced += 1
        if logprob is not None:
            self._logprobs.append(logprob)
        text, self.stopped = self._stops.push(self._utf8.push(piece))
        if not text:
            return None
        delta, self._logprobs = Delta(text=text, logprobs=self._logprobs or None), []
        return delta

    def finish(self, finish_reason: str, prompt_tokens: int) -> Delta:
        """The last Delta: held-back text (its last bytes may still complete a stop string), finish_reason
        ("stop" whenever a stop string was hit) and usage."""
        tail = ""
        if self.stopped:
            finish_reason = "stop"
        else:
            tail, self.stopped = self._stops.push(self._utf8.flush())
            tail, finish_reason = (tail, "stop") if self.stopped else (tail + self._stops.flush(), finish_reason)
        return Delta(text=tail, finish_reason=finish_reason, usage=Usage(prompt_tokens, self.produced),
                     logprobs=self._logprobs or None)
