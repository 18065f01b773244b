"""Legacy text completions (/v1/completions), as OpenAI names them."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from server.protocol.common import (
    LogitBias,
    MaxTokens,
    Penalty,
    Stop,
    StreamOptions,
    Temperature,
    TopP,
    Usage,
)

__all__ = ["CompletionRequest", "CompletionLogprobs", "CompletionChoice", "Completion"]


class CompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1)]
    suffix: str | None = None
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = 16  # OpenAI's default for this endpoint
    stop: Stop | None = None
    seed: int | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None
    logit_bias: LogitBias | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: TopP | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    ignore_eos: bool = False
    user: str | None = None
    keep_alive: str | float | None = None  # Ollama's: how long the model stays loaded after this request


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None
    usage: Usage | None = None
