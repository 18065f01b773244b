"""Engines name what was wrong in their own terms; each surface names the field the client wrote.
A JSON schema valid for jsonschema but one llama.cpp's grammar converter cannot express (a `pattern`
without ^...$ anchors) is blamed on where it came from: `response_format`, a forced tool's `tools`,
or the Responses API's `text.format`."""
import httpx
import pytest

UNEXPRESSIBLE = {"type": "object", "required": ["code"], "properties": {"code": {"type": "string", "pattern": "x+"}}}
HI = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": UNEXPRESSIBLE}}


@pytest.mark.parametrize("route, body, param", [
    ("/v1/chat/completions", {"messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": UNEXPRESSIBLE}}}, "response_format"),
    ("/v1/chat/completions", {"messages": HI, "tools": [TOOL], "tool_choice": "required"}, "tools"),
    ("/v1/responses", {"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x",
                                                          "schema": UNEXPRESSIBLE}}}, "text.format"),
    ("/v1/responses", {"input": "Hi", "tools": [{"type": "function", "name": "lookup", "parameters": UNEXPRESSIBLE}],
                       "tool_choice": "required"}, "tools"),
])
def test_an_engine_refused_schema_names_the_field_it_came_from(server, route, body, param):
    r = httpx.post(server.base_url + route, json={"model": "default", "max_tokens": 4, **body}, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert "schema" in error["message"].lower()


def test_a_prompt_too_long_names_each_surfaces_input_field(server):
    long = "word " * 5000
    chat = httpx.post(server.base_url + "/v1/chat/completions", timeout=120,
                      json={"model": "default", "messages": [{"role": "user", "content": long}]})
    completion = httpx.post(server.base_url + "/v1/completions", timeout=120,
                            json={"model": "default", "prompt": long, "max_tokens": 4})
    response = httpx.post(server.base_url + "/v1/responses", timeout=120, json={"model": "default", "input": long})
    for r, param in ((chat, "messages"), (completion, "prompt"), (response, "input")):
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert r.json()["error"]["param"] == param
