"""The Responses API (/v1/responses): request, Response object and stream events, as OpenAI names them."""
from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from server.protocol.common import MaxTokens, Temperature, TopP

__all__ = [
    "InputPart", "InputItem", "FunctionTool", "ToolChoiceFunction", "TextFormat", "TextConfig",
    "ResponseCreateRequest", "OutputText", "OutputMessage", "FunctionCallItem", "OutputItem", "ResponseUsage",
    "ResponseError", "IncompleteDetails", "ResponseObject", "ResponseDeleted", "LifecycleEvent", "OutputItemEvent",
    "ContentPartEvent", "TextDeltaEvent", "TextDoneEvent", "ArgumentsDeltaEvent", "ArgumentsDoneEvent",
    "StreamEvent",
]

Status = Literal["in_progress", "completed", "incomplete"]
ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]
ToolChoiceOption = Literal["none", "auto", "required"]


# --- request ---------------------------------------------------------------------------------------

class InputPart(msgspec.Struct):
    """A content part: input_text / output_text carry text; anything else (images, files) is refused later."""

    type: str
    text: str | UnsetType = UNSET


class InputItem(msgspec.Struct, kw_only=True):
    """One input item. A single flat Struct (not a tagged union) because easy messages may omit `type`;
    which fields are required depends on `type` and is checked when the item is translated."""

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"] | UnsetType = UNSET
    content: str | list[InputPart] | UnsetType = UNSET
    call_id: str | UnsetType = UNSET  # function_call, function_call_output
    name: str | UnsetType = UNSET  # function_call
    arguments: str | UnsetType = UNSET  # function_call
    output: str | list[InputPart] | UnsetType = UNSET  # function_call_output
    id: str | None | UnsetType = UNSET  # echoed items carry ids; they are not needed here


class FunctionTool(msgspec.Struct, kw_only=True):
    """Responses tools are flat ({type, name, parameters}); only `function` is served."""

    type: str
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")] | UnsetType = UNSET
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(msgspec.Struct):
    type: Literal["function"]
    name: str


class TextFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | UnsetType = UNSET
    schema: dict[str, Any] | UnsetType = UNSET
    strict: bool | None | UnsetType = UNSET
    description: str | None | UnsetType = UNSET


class TextConfig(msgspec.Struct, kw_only=True):
    format: TextFormat = msgspec.field(default_factory=lambda: TextFormat(type="text"))
    verbosity: str | None | UnsetType = UNSET


class ResponseCreateRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoiceOption | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_output_tokens: MaxTokens | None = None
    text: TextConfig | None = None
    stream: bool | None = None
    store: bool | None = None  # None = true, as OpenAI defaults it
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Extensions (the chat endpoint's names), for local sampling control.
    seed: int | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: TopP | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0.0)] | None = None
    keep_alive: str | float | None = None  # Ollama's: how long the model stays loaded after this request


# --- the Response object ----------------------------------------------------------------------------
# Output items are tagged so a stored response decodes back into the same types.

class OutputText(msgspec.Struct, tag_field="type", tag="output_text", kw_only=True):
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(msgspec.Struct, tag_field="type", tag="message", kw_only=True):
    id: str
    status: Status
    content: list[OutputText]
    role: Literal["assistant"] = "assistant"


class FunctionCallItem(msgspec.Struct, tag_field="type", tag="function_call", kw_only=True):
    id: str
    call_id: str
    name: str
    arguments: str
    status: Status


OutputItem = OutputMessage | FunctionCallItem


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class ResponseError(msgspec.Struct):
    code: str  # the SDK accepts a fixed set here: server_error, invalid_prompt, ...
    message: str


class IncompleteDetails(msgspec.Struct):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseObject(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = []
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: None = None
    store: bool = True
    temperature: float | None = None
    text: TextConfig = msgspec.field(default_factory=TextConfig)
    tool_choice: ToolChoiceOption | ToolChoiceFunction = "auto"
    tools: list[FunctionTool] = []
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = {}


class ResponseDeleted(msgspec.Struct):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True


# --- stream events (each sent as `event: <type>` + `data: <json>`) ----------------------------------

class LifecycleEvent(msgspec.Struct):
    """response.created / in_progress / completed / incomplete / failed: the whole Response."""

    type: str
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(msgspec.Struct):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(msgspec.Struct):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDeltaEvent(msgspec.Struct, kw_only=True):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []


class TextDoneEvent(msgspec.Struct, kw_only=True):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []


class ArgumentsDeltaEvent(msgspec.Struct, kw_only=True):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(msgspec.Struct, kw_only=True):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


StreamEvent = (LifecycleEvent | OutputItemEvent | ContentPartEvent | TextDeltaEvent | TextDoneEvent
               | ArgumentsDeltaEvent | ArgumentsDoneEvent)
