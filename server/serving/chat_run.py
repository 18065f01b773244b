"""One chat choice as typed events (text, tool-call start, argument fragments, finish), whatever
the tool mode: chat completions and the Responses API both render these events."""
from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from adapters.base import TokenLogprob, Usage
from server.serving.run import Generation
from server.serving.tools import ForcedCallParser, ToolMode, new_call_id, parse_auto_call

__all__ = ["TextDelta", "ReasoningDelta", "ToolCallStart", "ToolCallArgs", "Finish", "ChatEvent", "chat_run"]


class TextDelta(msgspec.Struct):
    text: str
    logprobs: list[TokenLogprob] | None = None


class ReasoningDelta(msgspec.Struct):
    """Thinking the model did before its answer (`<think>...</think>`), split out of the text:
    OpenAI chat renders it as `reasoning_content` (and `reasoning`), Ollama as `message.thinking`,
    Anthropic as a `thinking` content block."""

    text: str


class ToolCallStart(msgspec.Struct):
    index: int
    id: str
    name: str


class ToolCallArgs(msgspec.Struct):
    index: int
    fragment: str


class Finish(msgspec.Struct):
    reason: str
    usage: Usage | None


ChatEvent = TextDelta | ReasoningDelta | ToolCallStart | ToolCallArgs | Finish


def _finish_reason(reason: str, called: bool) -> str:
    return "tool_calls" if called and reason == "stop" else reason


async def chat_run(gen: Generation, mode: ToolMode) -> AsyncIterator[ChatEvent]:
    if getattr(gen.worker.adapter, "handles_tools", False):
        events = _plain(gen)  # the backend ran tools itself: its calls arrive as Delta.tool_calls
    elif mode.kind == "forced":
        events = _forced(gen)
    elif mode.kind == "auto":
        events = _auto(gen, mode.names)
    else:
        events = _plain(gen)
    async for event in events:
        yield event


async def _plain(gen: Generation) -> AsyncIterator[ChatEvent]:
    async for delta in gen.deltas():
        if delta.text or delta.logprobs:
            yield TextDelta(delta.text, delta.logprobs)
        for call in delta.tool_calls or ():
            if call.id is not None or call.name is not None:
                yield ToolCallStart(call.index, call.id or new_call_id(), call.name or "")
            if call.arguments:
                yield ToolCallArgs(call.index, call.arguments)
        if delta.finish_reason is not None:
            yield Finish(delta.finish_reason, delta.usage)


async def _forced(gen: Generation) -> AsyncIterator[ChatEvent]:
    """The grammar makes the output one call: stream its name, then its arguments as they come."""
    parser, call_id = ForcedCallParser(), new_call_id()
    async for delta in gen.deltas():
        pieces = [parser.push(delta.text)] if delta.text else []
        if delta.finish_reason is not None:
            pieces.append(parser.finish())
        for name, fragment in pieces:
            if name is not None:
                yield ToolCallStart(0, call_id, name)
            if fragment:
                yield ToolCallArgs(0, fragment)
        if delta.finish_reason is not None:
            yield Finish(_finish_reason(delta.finish_reason, parser.name is not None), delta.usage)


async def _auto(gen: Generation, names: list[str]) -> AsyncIterator[ChatEvent]:
    """The model may answer or call: a reply that starts with `{` is held until the end and sent
    as a call if it is one; any other reply streams as text from its first visible character."""
    held, held_logprobs, holding = "", [], None  # holding: None = undecided, True = maybe a call
    async for delta in gen.deltas():
        if holding is not False:
            held += delta.text
            held_logprobs += delta.logprobs or []
            if holding is None and held.strip():
                holding = held.lstrip().startswith("{")
            if holding is False:
                yield TextDelta(held, held_logprobs or None)
        elif delta.text or delta.logprobs:
            yield TextDelta(delta.text, delta.logprobs)
        if delta.finish_reason is None:
            continue
        call = parse_auto_call(held, names) if holding else None
        if call is not None:
            call_id = new_call_id()
            yield ToolCallStart(0, call_id, call[0])
            yield ToolCallArgs(0, call[1])
        elif holding is not False and held:
            yield TextDelta(held, held_logprobs or None)
        yield Finish(_finish_reason(delta.finish_reason, call is not None), delta.usage)
