"""Request Structs -> GenerateParams, and running one generation on a model's worker."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from adapters.base import Delta, GenerateParams
from adapters.worker import ModelWorker, TokenStream
from server.protocol.chat import ChatCompletionRequest
from server.protocol.completions import CompletionRequest

__all__ = ["chat_params", "completion_params", "Generation"]

log = logging.getLogger("omniloader.requests")

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repeat_penalty", "seed")


def _sampling(req: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    """Fields the request set win; then the manifest's defaults; then OpenAI's (GenerateParams)."""
    values = {}
    for name in _SAMPLING:
        value = getattr(req, name)
        if value is None:
            value = defaults.get(name)
        if value is not None:
            values[name] = value
    stop = req.stop if req.stop is not None else defaults.get("stop")
    values["stop"] = [stop] if isinstance(stop, str) else list(stop or [])
    values["ignore_eos"] = req.ignore_eos
    return values


def chat_params(req: ChatCompletionRequest, defaults: dict[str, Any]) -> GenerateParams:
    # Templates know system, user, assistant and tool; OpenAI's newer `developer` is a system turn.
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in req.messages]
    max_tokens = req.max_completion_tokens or req.max_tokens or defaults.get("max_tokens")
    return GenerateParams(messages=messages, max_tokens=max_tokens, **_sampling(req, defaults))


def completion_params(req: CompletionRequest, prompt: str, defaults: dict[str, Any]) -> GenerateParams:
    return GenerateParams(prompt=prompt, max_tokens=req.max_tokens, **_sampling(req, defaults))


@dataclass
class Generation:
    """One generation in flight: started() waits for the first delta, so anything that fails
    before the first token (context too long, bad template) fails before any byte is sent."""

    worker: ModelWorker
    params: GenerateParams
    endpoint: str
    stream: TokenStream | None = None
    first: Delta | None = None
    started_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    async def start(self) -> Delta:
        params = self.params
        self.stream = self.worker.stream(lambda adapter, cancel: adapter.generate(params, cancel))
        try:
            self.first = await anext(self.stream)
        except BaseException:
            self.stream.close()
            raise
        self.first_token_at = time.perf_counter()
        return self.first

    async def deltas(self):
        """All deltas, the first included; the last carries finish_reason and usage."""
        assert self.stream is not None and self.first is not None
        try:
            delta = self.first
            while True:
                yield delta
                if delta.finish_reason is not None:
                    self._log(delta)
                    return
                delta = await anext(self.stream)
        finally:
            self.stream.close()  # client gone or error: the worker stops within a token

    def _log(self, last: Delta) -> None:
        usage = last.usage
        log.info("%s model=%s prompt_tokens=%s completion_tokens=%s ttft=%.3fs total=%.3fs finish=%s",
                 self.endpoint, self.worker.adapter.id, usage and usage.prompt_tokens,
                 usage and usage.completion_tokens, (self.first_token_at or 0) - self.started_at,
                 time.perf_counter() - self.started_at, last.finish_reason)
