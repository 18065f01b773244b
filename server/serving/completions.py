"""Text completions: Deltas -> one `text_completion`, or its SSE chunks; one choice per prompt."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from server.protocol.common import Usage
from server.protocol.completions import Completion, CompletionChoice
from server.serving.chat import usage_of
from server.serving.generation import Generation
from server.serving.sse import DONE, error_event, event

__all__ = ["text_completion", "completion_events"]


async def text_completion(gens: list[Generation], model: str) -> Completion:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for index, gen in enumerate(gens):
        if gen.first is None:
            await gen.start()
        parts, last = [], None
        async for delta in gen.deltas():
            parts.append(delta.text)
            last = delta
        choices.append(CompletionChoice(index=index, text="".join(parts), finish_reason=last.finish_reason))
        usage = usage_of(last.usage)
        prompt_tokens += usage.prompt_tokens
        completion_tokens += usage.completion_tokens
    return Completion(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model, choices=choices,
                      usage=Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens))


async def completion_events(gens: list[Generation], model: str, include_usage: bool) -> AsyncIterator[bytes]:
    chunk_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = completion_tokens = 0

    def chunk(index: int, text: str, finish_reason: str | None = None) -> bytes:
        return event(Completion(id=chunk_id, created=created, model=model,
                                choices=[CompletionChoice(index=index, text=text, finish_reason=finish_reason)]))

    try:
        for index, gen in enumerate(gens):
            if gen.first is None:
                await gen.start()
            async for delta in gen.deltas():
                if delta.text or delta.finish_reason is not None:
                    yield chunk(index, delta.text, delta.finish_reason)
                if delta.usage is not None:
                    prompt_tokens += delta.usage.prompt_tokens
                    completion_tokens += delta.usage.completion_tokens
        if include_usage:
            yield event(Completion(id=chunk_id, created=created, model=model, choices=[],
                                   usage=Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)))
    except Exception as exc:
        yield error_event(exc)
    yield DONE
