"""OpenAI request Structs -> GenerateParams: sampling with the manifest's defaults, tool modes, JSON schemas."""
from __future__ import annotations

from typing import Any

import jsonschema

from adapters.base import GenerateParams
from server.errors import InvalidRequestError
from server.protocol.chat import ChatCompletionRequest
from server.protocol.completions import CompletionRequest
from server.serving.tools import (
    ToolMode,
    forced_call_schema,
    replay_tool_calls,
    tool_mode,
    tool_system_prompt,
)

__all__ = ["chat_params", "chat_tool_mode", "completion_params", "check_schema"]

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
