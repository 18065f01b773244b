"""Request Structs -> GenerateParams, and running one generation on a model's worker."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from adapters.base import Delta, GenerateParams
from adapters.worker import TokenStream
from server.errors import InvalidRequestError
from server.protocol.chat import ChatCompletionRequest
from server.protocol.completions import CompletionRequest
from server.router import Lease
from server.serving.tools import (
    ToolMode,
    forced_call_schema,
    replay_tool_calls,
    tool_mode,
    tool_system_prompt,
)

__all__ = ["chat_params", "chat_tool_mode", "completion_params", "check_schema", "Generation"]

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
    values["logit_bias"] = {int(token): bias for token, bias in (req.logit_bias or {}).items()}
    return values


def check_schema(schema: dict[str, Any], param: str) -> None:
    """A JSON schema that is not one is the client's error: 400 naming where it came from."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequestError(f"Invalid JSON schema: {exc.message}", param=param) from None


def chat_tool_mode(req: ChatCompletionRequest) -> ToolMode:
    choice = req.tool_choice
    if choice not in (None, "none", "auto") and not req.tools:
        raise InvalidRequestError("`tool_choice` needs `tools`.", param="tool_choice")
    mode = tool_mode(req.tools, choice)
    known = {t.function.name for t in req.tools or []}
    if mode.kind == "forced" and not set(mode.names) <= known:
        raise InvalidRequestError(f"tool_choice names function `{mode.names[0]}`, which is not in `tools`.",
                                  param="tool_choice")
    for i, tool in enumerate(req.tools or []):
        check_schema(tool.function.parameters or {"type": "object"}, f"tools[{i}].function.parameters")
    return mode


def _chat_messages(req: ChatCompletionRequest, mode: ToolMode) -> list[dict[str, Any]]:
    messages = []
    for m in req.messages:
        # Templates know system, user, assistant and tool; OpenAI's newer `developer` is a system turn.
        role = "system" if m.role == "developer" else m.role
        content = m.text()
        if m.role == "assistant" and m.tool_calls:
            content = "\n".join(filter(None, [content, replay_tool_calls(m.tool_calls)]))
        messages.append({"role": role, "content": content})
    if mode.kind != "none":
        prompt = tool_system_prompt(req.tools, mode)
        if messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages


def _response_schema(req: ChatCompletionRequest) -> dict[str, Any] | None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema is None:
        raise InvalidRequestError("response_format json_schema needs `json_schema.schema`.", param="response_format")
    check_schema(fmt.json_schema.schema, "response_format.json_schema.schema")
    return fmt.json_schema.schema


def chat_params(req: ChatCompletionRequest, defaults: dict[str, Any], mode: ToolMode | None = None) -> GenerateParams:
    mode = mode or chat_tool_mode(req)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequestError("`top_logprobs` needs `logprobs: true`.", param="top_logprobs")
    schema = forced_call_schema(req.tools, mode) if mode.kind == "forced" else _response_schema(req)
    max_tokens = req.max_completion_tokens or req.max_tokens or defaults.get("max_tokens")
    return GenerateParams(messages=_chat_messages(req, mode), max_tokens=max_tokens, json_schema=schema,
                          logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0, request=req,
                          **_sampling(req, defaults))


def completion_params(req: CompletionRequest, prompt: str, defaults: dict[str, Any]) -> GenerateParams:
    top = req.logprobs or 0
    return GenerateParams(prompt=prompt, max_tokens=req.max_tokens, suffix=req.suffix, logprobs=req.logprobs is not None,
                          top_logprobs=top, request=req, **_sampling(req, defaults))


@dataclass
class Generation:
    """One generation in flight: start() waits for the first delta, so anything that fails
    before the first token (context too long, bad template) fails before any byte is sent."""

    worker: Lease  # the request's hold on a model worker
    params: GenerateParams
    endpoint: str
    stream: TokenStream | None = None
    first: Delta | None = None
    started_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    async def start(self) -> Delta:
        params = self.params
        self.started_at = time.perf_counter()
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
        if self.first is None:
            await self.start()
        try:
            delta = self.first
            while True:
                yield delta
                if delta.finish_reason is not None:
                    self._log(delta)
                    return
                delta = await anext(self.stream)
        finally:
            self.stream.close()  # finished, failed or client gone: the worker stops within a token

    def _log(self, last: Delta) -> None:
        usage = last.usage
        ttft, total = (self.first_token_at or self.started_at) - self.started_at, time.perf_counter() - self.started_at
        if usage is not None:
            self.worker.observe_generation(usage.prompt_tokens, usage.completion_tokens, ttft, total)
        log.info("%s model=%s prompt_tokens=%s completion_tokens=%s ttft=%.3fs total=%.3fs finish=%s",
                 self.endpoint, self.worker.adapter.id, usage and usage.prompt_tokens,
                 usage and usage.completion_tokens, ttft, total, last.finish_reason)
