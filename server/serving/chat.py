"""Chat completions: Deltas -> one `chat.completion`, or `chat.completion.chunk` SSE events."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from msgspec import UNSET

from adapters.base import Usage as AdapterUsage
from server.protocol.chat import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChunkChoice,
    ChunkDelta,
)
from server.protocol.common import Usage
from server.serving.generation import Generation
from server.serving.sse import DONE, error_event, event

__all__ = ["usage_of", "chat_completion", "chat_events"]


def usage_of(usage: AdapterUsage | None) -> Usage:
    prompt, completion = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def chat_completion(gen: Generation, model: str) -> ChatCompletion:
    parts, last = [], None
    async for delta in gen.deltas():
        parts.append(delta.text)
        last = delta
    message = ChatCompletionMessage(role="assistant", content="".join(parts))
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        choices=[ChatChoice(index=0, message=message, finish_reason=last.finish_reason)],
        usage=usage_of(last.usage),
    )


async def chat_events(gen: Generation, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE body: a role chunk, content chunks, a finish chunk, [usage chunk], [DONE].
    An error after the first byte is sent in-band, then [DONE]."""
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    usage_field = None if include_usage else UNSET  # include_usage: `usage: null` on every chunk

    def chunk(delta: ChunkDelta, finish_reason: str | None = None) -> bytes:
        choice = ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)
        return event(ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[choice],
                                         usage=usage_field))

    yield chunk(ChunkDelta(role="assistant", content=""))
    try:
        async for delta in gen.deltas():
            if delta.text:
                yield chunk(ChunkDelta(content=delta.text))
            if delta.finish_reason is not None:
                yield chunk(ChunkDelta(), delta.finish_reason)
                if include_usage:
                    yield event(ChatCompletionChunk(id=chunk_id, created=created, model=model,
                                                    choices=[], usage=usage_of(delta.usage)))
    except Exception as exc:
        yield error_event(exc)
    yield DONE

