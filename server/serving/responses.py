"""The Responses API on the chat machinery: a Responses request becomes a ChatCompletionRequest
(so generation, tools and structured output are the chat endpoint's own), and the chat events of
its one generation become Responses stream events and the final Response object."""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
from msgspec import UNSET

from server.errors import InvalidRequestError, OpenAIError
from server.protocol.chat import (
    ChatCompletionRequest,
    ChatMessage,
    ChatTool,
    FunctionCall,
    FunctionDefinition,
    JsonSchemaFormat,
    NamedToolChoice,
    ResponseFormat,
    ToolCall,
)
from server.protocol.chat import ToolChoiceFunction as ChatToolChoiceFunction
from server.protocol.responses import (
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    FunctionCallItem,
    FunctionTool,
    IncompleteDetails,
    InputItem,
    InputPart,
    LifecycleEvent,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    ResponseCreateRequest,
    ResponseError,
    ResponseObject,
    ResponseUsage,
    StreamEvent,
    TextConfig,
    TextDeltaEvent,
    TextDoneEvent,
    ToolChoiceFunction,
)
from server.serving.chat import total_usage
from server.serving.chat_run import (
    ChatEvent,
    Finish,
    TextDelta,
    ToolCallArgs,
    ToolCallStart,
)
from server.serving.generation import check_schema
from server.storage.responses_store import StoredResponse

__all__ = ["input_messages", "replayed_messages", "chat_request", "new_response",
           "stored_row", "ResponseRun", "response_object", "response_sse"]

log = logging.getLogger("omniloader.responses")

_encode = msgspec.json.Encoder().encode
_TEXT_PARTS = ("input_text", "output_text", "text")
OnDone = Callable[[ResponseObject], Awaitable[None]] | None


# --- request -> chat request ------------------------------------------------------------------------

def _text(content: str | list[InputPart], param: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type not in _TEXT_PARTS or part.text is UNSET:
            raise InvalidRequestError(f"Content part type `{part.type}` is not supported; only text is.",
                                      param=f"{param}[{j}]")
        texts.append(part.text)
    return "".join(texts)


def _required(item: InputItem, field: str, i: int):
    value = getattr(item, field)
    if value is UNSET:
        raise InvalidRequestError(f"Input item of type `{item.type}` needs `{field}`.", param=f"input[{i}].{field}")
    return value


def input_messages(input: str | list[InputItem] | None) -> list[ChatMessage]:
    """`input` as chat messages: a string is one user turn; items map to the chat roles."""
    if input is None:
        return []
    if isinstance(input, str):
        return [ChatMessage(role="user", content=input)]
    messages: list[ChatMessage] = []
    for i, item in enumerate(input):
        if item.type == "message":
            messages.append(ChatMessage(role=_required(item, "role", i),
                                        content=_text(_required(item, "content", i), f"input[{i}].content")))
        elif item.type == "function_call":
            call = ToolCall(id=_required(item, "call_id", i),
                            function=FunctionCall(name=_required(item, "name", i),
                                                  arguments=_required(item, "arguments", i)))
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":  # one assistant turn: its text, then its calls
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif item.type == "function_call_output":
            messages.append(ChatMessage(role="tool", tool_call_id=_required(item, "call_id", i),
                                        content=_text(_required(item, "output", i), f"input[{i}].output")))
        elif item.type == "reasoning":
            continue  # clients replay reasoning items; this server makes none and needs none back
        else:
            raise InvalidRequestError(f"Input item type `{item.type}` is not supported.", param=f"input[{i}].type")
    return messages


def replayed_messages(row: StoredResponse) -> list[ChatMessage]:
    """A stored response as history: the conversation that produced it, then its output as the
    assistant's turn (text and calls together, as the chat endpoint replays them)."""
    messages = msgspec.json.decode(row.messages, type=list[ChatMessage])
    output = msgspec.json.decode(row.output, type=list[OutputItem])
    text = "".join(p.text for item in output if isinstance(item, OutputMessage) for p in item.content)
    calls = [ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
             for item in output if isinstance(item, FunctionCallItem)]
    if text or calls:
        messages.append(ChatMessage(role="assistant", content=text or None, tool_calls=calls or UNSET))
    return messages


def _chat_tool(tool: FunctionTool, i: int) -> ChatTool:
    if tool.type != "function":
        raise InvalidRequestError(f"Tool type `{tool.type}` is not supported; only `function` tools are.",
                                  param=f"tools[{i}].type")
    if tool.name is UNSET:
        raise InvalidRequestError("A function tool needs `name`.", param=f"tools[{i}].name")
    # Checked here so a bad schema names the Responses field, not the chat one.
    check_schema(tool.parameters or {"type": "object"}, f"tools[{i}].parameters")
    return ChatTool(type="function", function=FunctionDefinition(
        name=tool.name, description=tool.description, parameters=tool.parameters or {}, strict=tool.strict))


def _tool_choice(choice: str | ToolChoiceFunction | None):
    if isinstance(choice, ToolChoiceFunction):
        return NamedToolChoice(type="function", function=ChatToolChoiceFunction(name=choice.name))
    return choice


def _response_format(text: TextConfig | None) -> ResponseFormat | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.schema is UNSET:
        raise InvalidRequestError("`text.format` of type json_schema needs `schema`.", param="text.format.schema")
    check_schema(fmt.schema, "text.format.schema")
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
        name=fmt.name or "response", schema=fmt.schema, strict=fmt.strict or None,
        description=fmt.description or None))


def chat_request(req: ResponseCreateRequest, history: list[ChatMessage]
                 ) -> tuple[ChatCompletionRequest, list[ChatMessage]]:
    """(the chat request to run, the conversation to store: history + input, without instructions;
    OpenAI does not carry instructions over to a continued response either)."""
    conversation = [*history, *input_messages(req.input)]
    if not conversation:
        raise InvalidRequestError("`input` is required.", param="input")
    system = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    tools = [_chat_tool(t, i) for i, t in enumerate(req.tools or [])]
    chat = ChatCompletionRequest(
        model=req.model, messages=system + conversation, stream=bool(req.stream), temperature=req.temperature,
        top_p=req.top_p, max_tokens=req.max_output_tokens, tools=tools or None,
        tool_choice=_tool_choice(req.tool_choice), parallel_tool_calls=req.parallel_tool_calls,
        response_format=_response_format(req.text), seed=req.seed, top_k=req.top_k, min_p=req.min_p,
        repeat_penalty=req.repeat_penalty, user=req.user)
    return chat, conversation


def _echo_text(text: TextConfig | None) -> TextConfig:
    if text is None:
        return TextConfig()
    if text.format.type == "json_schema" and not text.format.name:
        return TextConfig(format=msgspec.structs.replace(text.format, name="response"), verbosity=text.verbosity)
    return text


def new_response(req: ResponseCreateRequest, model: str, temperature: float, top_p: float) -> ResponseObject:
    """The Response as it starts: in progress, no output; the request's settings echoed."""
    return ResponseObject(
        id=f"resp_{uuid.uuid4().hex}", created_at=int(time.time()), status="in_progress", model=model,
        instructions=req.instructions, max_output_tokens=req.max_output_tokens,
        parallel_tool_calls=req.parallel_tool_calls is not False, previous_response_id=req.previous_response_id,
        store=req.store is not False, temperature=temperature, top_p=top_p, text=_echo_text(req.text),
        tool_choice=req.tool_choice or "auto", tools=req.tools or [], user=req.user, metadata=req.metadata or {})


def stored_row(response: ResponseObject, conversation: list[ChatMessage]) -> StoredResponse:
    return StoredResponse(id=response.id, created_at=response.created_at, model=response.model,
                          messages=_encode(conversation).decode(), output=_encode(response.output).decode(),
                          response=_encode(response).decode())


# --- chat events -> Responses events ----------------------------------------------------------------

class ResponseRun:
    """One response being written: turns chat events into Responses stream events (numbered from 0)
    and builds the final Response as it goes. Items are replaced, never mutated, so an event
    already handed out keeps showing the item as it was then."""

    def __init__(self, response: ResponseObject) -> None:
        self.response = response
        self._seq = 0
        self._index: int | None = None  # output index of the item being written
        self._pieces: list[str] = []  # its text or argument fragments so far

    def _next(self) -> int:
        self._seq += 1
        return self._seq - 1

    def _lifecycle(self, type_: str) -> LifecycleEvent:
        snapshot = msgspec.structs.replace(self.response, output=list(self.response.output))
        return LifecycleEvent(type=type_, sequence_number=self._next(), response=snapshot)

    def _open(self, item: OutputItem) -> list[StreamEvent]:
        self.response.output.append(item)
        self._index, self._pieces = len(self.response.output) - 1, []
        events: list[StreamEvent] = [OutputItemEvent("response.output_item.added", self._next(), self._index, item)]
        if isinstance(item, OutputMessage):
            events.append(ContentPartEvent("response.content_part.added", self._next(), item.id, self._index, 0,
                                           OutputText(text="")))
        return events

    def _close(self, status: str) -> list[StreamEvent]:
        if self._index is None:
            return []
        index, item, joined = self._index, self.response.output[self._index], "".join(self._pieces)
        self._index = None
        if isinstance(item, OutputMessage):
            part = OutputText(text=joined)
            done = OutputMessage(id=item.id, status=status, content=[part])
            events = [TextDoneEvent(sequence_number=self._next(), item_id=item.id, output_index=index,
                                    content_index=0, text=joined),
                      ContentPartEvent("response.content_part.done", self._next(), item.id, index, 0, part)]
        else:
            done = msgspec.structs.replace(item, arguments=joined, status=status)
            events = [ArgumentsDoneEvent(sequence_number=self._next(), item_id=item.id, output_index=index,
                                         name=item.name, arguments=joined)]
        self.response.output[index] = done
        return [*events, OutputItemEvent("response.output_item.done", self._next(), index, done)]

    def _handle(self, ev: ChatEvent) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        current = None if self._index is None else self.response.output[self._index]
        if isinstance(ev, TextDelta):
            if not ev.text:
                return events
            if not isinstance(current, OutputMessage):
                events += self._close("completed")
                events += self._open(OutputMessage(id=f"msg_{uuid.uuid4().hex}", status="in_progress", content=[]))
            self._pieces.append(ev.text)
            events.append(TextDeltaEvent(sequence_number=self._next(), item_id=self.response.output[self._index].id,
                                         output_index=self._index, content_index=0, delta=ev.text))
        elif isinstance(ev, ToolCallStart):
            events += self._close("completed")
            events += self._open(FunctionCallItem(id=f"fc_{uuid.uuid4().hex}", call_id=ev.id, name=ev.name,
                                                  arguments="", status="in_progress"))
        elif isinstance(ev, ToolCallArgs):
            self._pieces.append(ev.fragment)
            events.append(ArgumentsDeltaEvent(sequence_number=self._next(), item_id=current.id,
                                              output_index=self._index, delta=ev.fragment))
        elif isinstance(ev, Finish):
            if not self.response.output:  # an empty answer is still an (empty) message
                events += self._open(OutputMessage(id=f"msg_{uuid.uuid4().hex}", status="in_progress", content=[]))
            status = "incomplete" if ev.reason == "length" else "completed"
            events += self._close(status)
            usage = total_usage([ev.usage])
            self.response.usage = ResponseUsage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                                                total_tokens=usage.total_tokens)
            self.response.status = status
            if status == "incomplete":
                self.response.incomplete_details = IncompleteDetails("max_output_tokens")
        return events

    async def events(self, chat_events: AsyncIterator[ChatEvent], on_done: OnDone = None
                     ) -> AsyncIterator[StreamEvent]:
        """The whole stream. on_done sees the finished Response before its last event is sent, so a
        client that asks for it right after the stream ends finds it stored."""
        yield self._lifecycle("response.created")
        yield self._lifecycle("response.in_progress")
        async for ev in chat_events:
            for out in self._handle(ev):
                yield out
        if self.response.status == "in_progress":
            raise RuntimeError("the generation ended without a finish reason")
        if on_done is not None:
            await on_done(self.response)
        yield self._lifecycle(f"response.{self.response.status}")

    def failed(self, exc: BaseException) -> LifecycleEvent:
        """An error after the first byte: the stream ends with `response.failed` carrying it. The SDK
        accepts only OpenAI's own error codes there, so client errors read invalid_prompt."""
        if isinstance(exc, OpenAIError):
            code = "invalid_prompt" if exc.status_code < 500 else "server_error"
            message = exc.message
        else:
            log.error("error during a streamed response", exc_info=exc)
            code, message = "server_error", "The server had an error while streaming the response."
        self.response.status = "failed"
        self.response.error = ResponseError(code=code, message=message)
        return self._lifecycle("response.failed")


def _sse(ev: StreamEvent) -> bytes:
    return b"event: " + ev.type.encode() + b"\ndata: " + _encode(ev) + b"\n\n"


async def response_object(run: ResponseRun, chat_events: AsyncIterator[ChatEvent],
                          on_done: OnDone = None) -> ResponseObject:
    async for _ in run.events(chat_events, on_done):
        pass
    return run.response


async def response_sse(run: ResponseRun, chat_events: AsyncIterator[ChatEvent],
                       on_done: OnDone = None) -> AsyncIterator[bytes]:
    """The SSE body: `event: <type>` + `data: <json>` per event; no [DONE] (the Responses API ends
    with its terminal event)."""
    try:
        async for ev in run.events(chat_events, on_done):
            yield _sse(ev)
    except Exception as exc:
        yield _sse(run.failed(exc))
