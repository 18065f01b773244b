"""Chat completions: chat events -> one `chat.completion`, or `chat.completion.chunk` SSE events."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable

from msgspec import UNSET

from adapters.base import TokenLogprob
from adapters.base import Usage as AdapterUsage
from server.protocol.chat import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatTokenLogprob,
    ChoiceLogprobs,
    ChunkChoice,
    ChunkDelta,
    FunctionCall,
    FunctionCallDelta,
    ToolCall,
    ToolCallDelta,
    TopLogprobEntry,
)
from server.protocol.common import Usage
from server.serving.chat_run import Finish, TextDelta, ToolCallArgs, ToolCallStart, chat_run
from server.serving.run import Generation
from server.serving.sse import DONE, error_event, event
from server.serving.tools import ToolMode

__all__ = ["total_usage", "chat_logprobs", "chat_completion", "chat_events"]

OnDone = Callable[[str, str], None] | None  # (completion id, the first choice's text) once a stream ends well


def total_usage(usages: list[AdapterUsage | None]) -> Usage:
    """The prompt is counted once (every choice shares it); completions add up."""
    usages = [u for u in usages if u is not None]
    prompt = usages[0].prompt_tokens if usages else 0
    completion = sum(u.completion_tokens for u in usages)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def chat_logprobs(items: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if items is None:
        return None
    return ChoiceLogprobs(content=[
        ChatTokenLogprob(t.token, t.logprob, t.bytes, [TopLogprobEntry(a.token, a.logprob, a.bytes) for a in t.top])
        for t in items])


async def chat_completion(gens: list[Generation], model: str, mode: ToolMode, logprobs: bool) -> ChatCompletion:
    choices, usages = [], []
    for index, gen in enumerate(gens):
        text, tokens, calls, finish = [], [], {}, None
        async for ev in chat_run(gen, mode):
            if isinstance(ev, TextDelta):
                text.append(ev.text)
                tokens += ev.logprobs or []
            elif isinstance(ev, ToolCallStart):
                calls[ev.index] = (ev.id, ev.name, [])
            elif isinstance(ev, ToolCallArgs):
                calls[ev.index][2].append(ev.fragment)
            elif isinstance(ev, Finish):
                finish = ev
        tool_calls = [ToolCall(id=i, function=FunctionCall(name=n, arguments="".join(a))) for i, n, a in calls.values()]
        message = ChatCompletionMessage(role="assistant", content=None if tool_calls else "".join(text),
                                        tool_calls=tool_calls or UNSET)
        choices.append(ChatChoice(index=index, message=message, finish_reason=finish.reason,
                                  logprobs=chat_logprobs(tokens) if logprobs else None))
        usages.append(finish.usage)
    return ChatCompletion(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model, choices=choices,
                          usage=total_usage(usages))


async def chat_events(gens: list[Generation], model: str, mode: ToolMode, include_usage: bool,
                      logprobs: bool, on_done: OnDone = None) -> AsyncIterator[bytes]:
    """The SSE body. Per choice: a first chunk with the role and the first content or tool call,
    more chunks, a finish chunk; then [a usage chunk and] [DONE]. An error after the first byte
    is sent in-band, then [DONE]."""
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    usage_field = None if include_usage else UNSET  # include_usage: `usage: null` on every chunk

    def chunk(index: int, delta: ChunkDelta, finish_reason: str | None = None, lps=None) -> bytes:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=lps)
        return event(ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[choice],
                                         usage=usage_field))

    usages, first_text = [], []
    try:
        for index, gen in enumerate(gens):
            role = "assistant"  # sent once per choice, with its first piece
            async for ev in chat_run(gen, mode):
                if isinstance(ev, TextDelta):
                    if index == 0:
                        first_text.append(ev.text)
                    yield chunk(index, ChunkDelta(role=role or UNSET, content=ev.text), None,
                                chat_logprobs(ev.logprobs or []) if logprobs else None)
                elif isinstance(ev, ToolCallStart):
                    call = ToolCallDelta(index=ev.index, id=ev.id, type="function",
                                         function=FunctionCallDelta(name=ev.name, arguments=""))
                    yield chunk(index, ChunkDelta(role=role or UNSET, content=None if role else UNSET,
                                                  tool_calls=[call]))
                elif isinstance(ev, ToolCallArgs):
                    call = ToolCallDelta(index=ev.index, function=FunctionCallDelta(arguments=ev.fragment))
                    yield chunk(index, ChunkDelta(tool_calls=[call]))
                else:
                    yield chunk(index, ChunkDelta(role=role or UNSET, content="" if role else UNSET), ev.reason)
                    usages.append(ev.usage)
                role = None
        if include_usage:
            yield event(ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[],
                                            usage=total_usage(usages)))
        if on_done is not None:
            on_done(chunk_id, "".join(first_text))
    except Exception as exc:
        yield error_event(exc)
    yield DONE
