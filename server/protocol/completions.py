"""Legacy text completions (/v1/completions), as OpenAI names them."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from server.protocol.common import MaxTokens, SamplingRequest, Usage

__all__ = ["CompletionRequest", "CompletionLogprobs", "CompletionChoice", "Completion"]


class CompletionRequest(SamplingRequest, kw_only=True):
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1)]
    suffix: str | None = None
    echo: bool = False
    max_tokens: MaxTokens | None = 16  # OpenAI's default for this endpoint
    logprobs: Annotated[int, msgspec.Meta(ge=0, le=5)] | None = None


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
