"""Chat completions: request, response and stream chunk, as OpenAI names them."""
from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from server.protocol.common import MaxTokens, Penalty, Stop, StreamOptions, Temperature, TopP, Usage

__all__ = [
    "ContentPart",
    "ChatMessage",
    "ChatCompletionRequest",
    "ChatCompletionMessage",
    "ChatChoice",
    "ChatCompletion",
    "ChunkDelta",
    "ChunkChoice",
    "ChatCompletionChunk",
]

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ContentPart(msgspec.Struct):
    type: str
    text: str | UnsetType = UNSET
    image_url: Any = UNSET


class ChatMessage(msgspec.Struct):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | UnsetType = UNSET
    tool_calls: list[dict[str, Any]] | UnsetType = UNSET
    tool_call_id: str | UnsetType = UNSET

    def text(self) -> str:
        """The message's text: a string as is, content parts' text joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content if p.type == "text" and isinstance(p.text, str))


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    stop: Stop | None = None
    seed: int | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # Extensions many clients send (llama.cpp, vLLM, Ollama names).
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: TopP | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    ignore_eos: bool = False
    user: str | None = None


class ChatCompletionMessage(msgspec.Struct):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatCompletionMessage
    finish_reason: str | None
    logprobs: Any = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None


class ChunkDelta(msgspec.Struct):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChunkChoice(msgspec.Struct):
    index: int
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: Any = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None
    # Present (as null) on every chunk only when stream_options.include_usage is set.
    usage: Usage | None | UnsetType = UNSET
