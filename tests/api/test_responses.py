"""POST/GET/DELETE /v1/responses on the default model, through the real SDK with strict response
validation: text equal to chat completions, streaming events, function calls, stored
conversations, structured output, and the errors."""
import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from openai._models import validate_type
from openai.types.responses import ResponseStreamEvent

from server.errors import ContextLengthExceeded
from server.protocol.responses import ResponseObject
from server.serving.chat_run import Finish, TextDelta
from server.serving.responses import ResponseRun, response_sse

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather for a city", "strict": True,
           "parameters": {"type": "object",
                          "properties": {"city": {"type": "string"},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"type": "function", "name": "get_time", "description": "Current time in a timezone", "strict": True,
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"],
                       "additionalProperties": False}}
ASK = "What's the weather like in Paris right now?"
GREEDY = {"model": "default", "temperature": 0}
TIMEOUT = 120  # raw httpx calls; the SDK client has its own


def _chat(client, messages, **kwargs):
    return client.chat.completions.create(model="default", temperature=0, messages=messages, **kwargs)


def test_text_equals_chat_completions_and_usage_adds_up(client):
    resp = client.responses.create(input="Hi", max_output_tokens=16, **GREEDY)
    chat = _chat(client, [{"role": "user", "content": "Hi"}], max_tokens=16)
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.model == "smollm2-135m-instruct"
    assert resp.output_text and resp.output_text == chat.choices[0].message.content
    (message,) = resp.output
    assert message.type == "message" and message.id.startswith("msg_") and message.role == "assistant"
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    expected = "incomplete" if chat.choices[0].finish_reason == "length" else "completed"
    assert resp.status == message.status == expected
    assert resp.temperature == 0 and resp.max_output_tokens == 16 and resp.store is True


def test_instructions_are_a_system_message(client):
    resp = client.responses.create(instructions="Answer in French.", input="Hi", max_output_tokens=16, **GREEDY)
    chat = _chat(client, [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
                 max_tokens=16)
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.instructions == "Answer in French."


def test_max_output_tokens_cut_makes_it_incomplete(client):
    resp = client.responses.create(input="Tell me a long story about a dragon.", max_output_tokens=5, **GREEDY)
    assert resp.status == "incomplete"
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output[0].status == "incomplete"
    assert resp.usage.output_tokens == 5


def test_stream_events_in_order_and_deltas_join_to_the_text(client):
    full = client.responses.create(input="Hi", max_output_tokens=16, **GREEDY)
    events = list(client.responses.create(input="Hi", max_output_tokens=16, stream=True, **GREEDY))
    types = [e.type for e in events]
    n = types.count("response.output_text.delta")
    assert n >= 2
    terminal = "response.completed" if full.status == "completed" else "response.incomplete"
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * n,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done", terminal]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    created, final = events[0].response, events[-1].response
    assert created.status == "in_progress" and created.output == [] and final.id == created.id
    item = events[2].item
    assert item.type == "message" and item.status == "in_progress"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert all(e.item_id == item.id for e in events[3:-2])
    assert deltas == events[-4].text == final.output_text == full.output_text
    assert events[-2].item.id == item.id and events[-2].item.content[0].text == deltas
    assert final.usage.model_dump() == full.usage.model_dump()


def test_stream_is_named_sse_without_done_and_the_sdk_helper_accumulates_it(client, server):
    body = {"model": "default", "input": "Hi", "max_output_tokens": 8, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/responses", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    blocks = [b for b in text.split("\n\n") if b]
    assert "[DONE]" not in text
    for block in blocks:
        event_line, data_line = block.split("\n")
        assert event_line == f"event: {json.loads(data_line.removeprefix('data: '))['type']}"
    # Room for the whole answer: the SDK's helper wants `response.completed`, not `response.incomplete`.
    with client.responses.stream(input="Hi", max_output_tokens=48, **GREEDY) as stream:
        final = stream.get_final_response()
    assert final.output_text == client.responses.create(input="Hi", max_output_tokens=48, **GREEDY).output_text


def test_required_tool_call_is_a_function_call_item_valid_for_its_schema(client):
    resp = client.responses.create(input=ASK, tools=[WEATHER, TIME], tool_choice="required", max_output_tokens=64,
                                   **GREEDY)
    assert resp.status == "completed"
    (call,) = resp.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.name]["parameters"]
    jsonschema.validate(json.loads(call.arguments), schema)
    assert resp.tool_choice == "required" and [t.name for t in resp.tools] == ["get_weather", "get_time"]


def test_streamed_function_call_arguments_join_to_the_final_arguments(client):
    kwargs = dict(input=ASK, tools=[WEATHER, TIME], tool_choice={"type": "function", "name": "get_weather"},
                  max_output_tokens=64, **GREEDY)
    full = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    n = types.count("response.function_call_arguments.delta")
    assert n >= 2, "arguments should arrive as several fragments"
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     *["response.function_call_arguments.delta"] * n, "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = events[2].item
    assert added.type == "function_call" and added.name == "get_weather" and added.arguments == ""
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == events[-3].arguments == events[-2].item.arguments == full.output[0].arguments
    assert events[-1].response.output[0].arguments == arguments
    jsonschema.validate(json.loads(arguments), WEATHER["parameters"])


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(input="My name is Ada and I like tea.", max_output_tokens=24, **GREEDY)
    second = client.responses.create(previous_response_id=first.id, input="What is my name?",
                                     max_output_tokens=24, **GREEDY)
    # Right after `second`: greedy text can depend on what the engine's prompt cache holds.
    chat = _chat(client, [{"role": "user", "content": "My name is Ada and I like tea."},
                          {"role": "assistant", "content": first.output_text},
                          {"role": "user", "content": "What is my name?"}], max_tokens=24)
    fresh = client.responses.create(input="What is my name?", max_output_tokens=24, **GREEDY)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens >= fresh.usage.input_tokens + first.usage.output_tokens + 8
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    assert second.output_text == chat.choices[0].message.content


def test_function_call_output_round_trip(client):
    called = client.responses.create(input=ASK, tools=[WEATHER], tool_choice="required", max_output_tokens=64,
                                     **GREEDY)
    call = called.output[0]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21, "sky": "clear"}'}
    answer = client.responses.create(previous_response_id=called.id, input=[result], tools=[WEATHER],
                                     max_output_tokens=32, **GREEDY)
    # The same turn sent statelessly, as items, must be the same prompt.
    stateless = client.responses.create(input=[
        {"role": "user", "content": [{"type": "input_text", "text": ASK}]},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        result], tools=[WEATHER], max_output_tokens=32, **GREEDY)
    tool_call = {"id": call.call_id, "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}
    chat_tool = {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}
    chat = _chat(client, [{"role": "user", "content": ASK},
                          {"role": "assistant", "content": None, "tool_calls": [tool_call]},
                          {"role": "tool", "tool_call_id": call.call_id, "content": result["output"]}],
                 tools=[chat_tool], max_tokens=32)
    assert answer.usage.input_tokens == stateless.usage.input_tokens == chat.usage.prompt_tokens
    assert answer.usage.input_tokens > called.usage.input_tokens
    assert [i.type for i in answer.output] == [i.type for i in stateless.output]
    assert answer.output_text == stateless.output_text


def test_retrieve_and_delete_a_stored_response(client, server):
    resp = client.responses.create(input="Hi", max_output_tokens=8, **GREEDY)
    got = client.responses.retrieve(resp.id)
    assert got.model_dump() == resp.model_dump()
    deleted = httpx.delete(f"{server.base_url}/v1/responses/{resp.id}", timeout=TIMEOUT)
    assert deleted.status_code == 200
    assert deleted.json() == {"id": resp.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(resp.id)
    kept = client.responses.create(input="Hi", max_output_tokens=8, **GREEDY)
    assert client.responses.delete(kept.id) is None  # the SDK's delete returns nothing on 200


def test_unknown_previous_response_id_is_a_404_envelope(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(previous_response_id="resp_nope", input="Hi", max_output_tokens=8, **GREEDY)
    error = err.value.body
    assert error["param"] == "previous_response_id" and error["type"] == "invalid_request_error"
    assert "resp_nope" in error["message"]


def test_store_false_is_not_retrievable_nor_continuable(client):
    resp = client.responses.create(input="Hi", max_output_tokens=8, store=False, **GREEDY)
    assert resp.store is False and resp.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(previous_response_id=resp.id, input="Hi", max_output_tokens=8, **GREEDY)


def test_text_format_json_schema_output_validates(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
              "required": ["name", "age"], "additionalProperties": False}
    resp = client.responses.create(input="Describe a person called Bob who is 30, as JSON.", max_output_tokens=64,
                                   text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                    "strict": True}}, **GREEDY)
    assert resp.status == "completed"
    jsonschema.validate(json.loads(resp.output_text), schema)
    assert resp.text.format.type == "json_schema" and resp.text.format.name == "person"
    obj = client.responses.create(input="Give a JSON object with the key city for Paris.", max_output_tokens=64,
                                  text={"format": {"type": "json_object"}}, **GREEDY)
    assert obj.status == "completed" and isinstance(json.loads(obj.output_text), dict)


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"input": "Hi", "temperature": 3}, "temperature"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({}, "input"),
])
def test_bad_requests_are_400_naming_the_field(server, body, param):
    r = httpx.post(server.base_url + "/v1/responses", json={"model": "default", **body}, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_an_error_mid_stream_ends_with_response_failed():
    """In process: a failure after the first byte becomes a `response.failed` event the SDK accepts."""
    async def events():
        yield TextDelta("Hel")
        raise ContextLengthExceeded("The context is full.")

    async def collect():
        run = ResponseRun(ResponseObject(id="resp_x", created_at=0, status="in_progress", model="m"))
        return [chunk async for chunk in response_sse(run, events())]

    blocks = asyncio.run(collect())
    parsed = [validate_type(type_=ResponseStreamEvent, value=json.loads(b.decode().split("data: ", 1)[1]))
              for b in blocks]
    assert [e.type for e in parsed] == ["response.created", "response.in_progress", "response.output_item.added",
                                        "response.content_part.added", "response.output_text.delta",
                                        "response.failed"]
    failed = parsed[-1].response
    assert failed.status == "failed" and failed.error.code == "invalid_prompt"
    assert failed.error.message == "The context is full."


def test_a_finished_stream_ends_with_its_terminal_event_only():
    async def events():
        yield TextDelta("Hi")
        yield Finish("stop", None)

    async def collect():
        run = ResponseRun(ResponseObject(id="resp_x", created_at=0, status="in_progress", model="m"))
        return [chunk async for chunk in response_sse(run, events())]

    blocks = asyncio.run(collect())
    assert blocks[-1].startswith(b"event: response.completed\n")
    final = validate_type(type_=ResponseStreamEvent, value=json.loads(blocks[-1].decode().split("data: ", 1)[1]))
    assert final.response.output_text == "Hi" and final.response.usage.total_tokens == 0
