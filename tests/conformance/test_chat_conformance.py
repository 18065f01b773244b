"""One test per way peer servers are known to break OpenAI clients, written from the OpenAI API
reference and checked on the raw wire JSON (so an SDK's leniency cannot hide a deviation)."""
import json

import httpx
import pytest

MSGS = [{"role": "user", "content": "What is the capital of France?"}]
TOOL = {"type": "function", "function": {"name": "lookup_capital", "description": "Capital city of a country",
                                         "parameters": {"type": "object", "properties": {"country": {"type": "string"}},
                                                        "required": ["country"]}}}


def post(server, body, path="/v1/chat/completions"):
    return httpx.post(server.base_url + path, json={"model": "default", **body}, timeout=120)


def sse(server, body, path="/v1/chat/completions"):
    """(parsed data events, raw event strings) of a streamed request."""
    with httpx.stream("POST", server.base_url + path, json={"model": "default", "stream": True, **body},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        raw = [e for e in r.read().decode().split("\n\n") if e]
    assert raw[-1] == "data: [DONE]"
    return [json.loads(e.removeprefix("data: ")) for e in raw[:-1]], raw


def test_include_usage_adds_a_final_usage_chunk_and_null_usage_elsewhere(server):
    events, _ = sse(server, {"messages": MSGS, "max_tokens": 8, "stream_options": {"include_usage": True}})
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and set(events[-1]["usage"]) >= {"prompt_tokens", "completion_tokens",
                                                                        "total_tokens"}
    plain, _ = sse(server, {"messages": MSGS, "max_tokens": 8})
    assert all("usage" not in e for e in plain)  # without the option, no usage key at all


def test_streamed_tool_call_deltas_carry_index_and_string_arguments(server):
    events, _ = sse(server, {"messages": MSGS, "tools": [TOOL], "tool_choice": "required", "temperature": 0})
    calls = [tc for e in events for c in e["choices"] for tc in c["delta"].get("tool_calls", [])]
    assert calls and all(tc["index"] == 0 for tc in calls)
    assert calls[0]["id"] and calls[0]["type"] == "function" and calls[0]["function"]["name"] == "lookup_capital"
    assert all(set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"} for tc in calls[1:])
    assert all(isinstance(tc["function"]["arguments"], str) for tc in calls)
    assert json.loads("".join(tc["function"]["arguments"] for tc in calls))["country"]


def test_tool_call_arguments_are_a_json_string_and_content_is_null(server):
    msg = post(server, {"messages": MSGS, "tools": [TOOL], "tool_choice": "required", "temperature": 0}).json()
    message = msg["choices"][0]["message"]
    assert "content" in message and message["content"] is None
    assert isinstance(message["tool_calls"][0]["function"]["arguments"], str)
    assert isinstance(json.loads(message["tool_calls"][0]["function"]["arguments"]), dict)


def test_finish_reason_table(server):
    assert post(server, {"messages": MSGS, "max_tokens": 2, "ignore_eos": True}).json()["choices"][0][
        "finish_reason"] == "length"
    hi = [{"role": "user", "content": "Hi! What is the capital of France?"}]
    natural = post(server, {"messages": hi, "temperature": 0, "max_tokens": 200}).json()["choices"][0]
    assert natural["finish_reason"] == "stop"
    word = natural["message"]["content"].split()[1]
    stopped = post(server, {"messages": hi, "temperature": 0, "stop": [word]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and word not in stopped["message"]["content"]
    called = post(server, {"messages": MSGS, "tools": [TOOL], "tool_choice": "required", "temperature": 0,
                           "max_tokens": 64}).json()["choices"][0]
    assert called["finish_reason"] == "tool_calls"


def test_tool_choice_object_form_names_the_function(server):
    other = {"type": "function", "function": {"name": "other_tool", "parameters": {"type": "object"}}}
    body = {"messages": MSGS, "tools": [other, TOOL], "temperature": 0,
            "tool_choice": {"type": "function", "function": {"name": "lookup_capital"}}}
    call = post(server, body).json()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "lookup_capital"
    bad = post(server, {**body, "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tool_choice"


def test_json_schema_is_enforced_not_just_requested(server):
    import jsonschema

    schema = {"type": "object", "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
              "required": ["answer", "confidence"], "additionalProperties": False}
    out = post(server, {"messages": MSGS, "temperature": 0, "max_tokens": 100, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}}).json()
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), schema)
    invalid = post(server, {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "object", "properties": {"x": {"type": 12}}}}}})
    assert invalid.status_code == 400
    assert invalid.json()["error"]["param"] == "response_format.json_schema.schema"


def test_assistant_content_null_with_tool_calls_is_accepted_in_history(server):
    history = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "lookup_capital", "arguments": "{\"country\": \"France\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "Paris"}]
    r = post(server, {"messages": history, "tools": [TOOL], "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_context_overflow_is_a_400_with_both_numbers(server):
    r = post(server, {"messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 10})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error"
    assert "4096" in err["message"] and "5" in err["message"]
    r = post(server, {"messages": MSGS, "max_tokens": 4090})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_error_envelope_before_and_after_streaming_began(server):
    r = post(server, {"messages": MSGS, "n": 0})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["param"] == "n"
    # The second prompt cannot fit: the first streams, then the error arrives in-band, then [DONE].
    events, raw = sse(server, {"prompt": ["Hello", "word " * 5000], "max_tokens": 4}, path="/v1/completions")
    assert events[0]["choices"][0]["index"] == 0
    assert set(events[-1]) == {"error"} and events[-1]["error"]["code"] == "context_length_exceeded"
    assert set(events[-1]["error"]) == {"message", "type", "param", "code"}


def test_max_completion_tokens_is_honoured_like_max_tokens(server):
    out = post(server, {"messages": MSGS, "max_completion_tokens": 3, "ignore_eos": True}).json()
    assert out["usage"]["completion_tokens"] == 3 and out["choices"][0]["finish_reason"] == "length"


def test_developer_role_is_a_system_instruction(server):
    sys_msg = post(server, {"messages": [{"role": "system", "content": "Answer in French."}] + MSGS,
                            "temperature": 0, "max_tokens": 12}).json()
    dev_msg = post(server, {"messages": [{"role": "developer", "content": "Answer in French."}] + MSGS,
                            "temperature": 0, "max_tokens": 12}).json()
    assert dev_msg["choices"][0]["message"]["content"] == sys_msg["choices"][0]["message"]["content"]
    assert dev_msg["usage"]["prompt_tokens"] == sys_msg["usage"]["prompt_tokens"]


def test_logprobs_without_top_logprobs_gives_empty_top_lists(server):
    out = post(server, {"messages": MSGS, "max_tokens": 4, "logprobs": True}).json()
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"]
    assert all(t["top_logprobs"] == [] and t["logprob"] <= 0 and isinstance(t["bytes"], list) for t in content)
    assert post(server, {"messages": MSGS, "max_tokens": 4}).json()["choices"][0]["logprobs"] is None
    bad = post(server, {"messages": MSGS, "top_logprobs": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"


@pytest.mark.parametrize("body, param", [
    ({"messages": MSGS, "n": 17}, "n"),
    ({"messages": MSGS, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": MSGS, "tools": [TOOL], "tool_choice": "maybe"}, "tool_choice"),
    ({"messages": MSGS, "tool_choice": "required"}, "tool_choice"),
    ({"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools[0].function.parameters"),
])
def test_bad_parameters_are_400s_naming_the_param(server, body, param):
    r = post(server, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
