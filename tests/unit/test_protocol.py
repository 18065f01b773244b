import msgspec
import pytest
from msgspec import UNSET

from server.errors import InvalidRequestError, decode_body
from server.protocol.chat import ChatCompletionChunk, ChatCompletionRequest, ChunkChoice, ChunkDelta
from server.serving.generation import chat_params
from server.settings import load_settings


def test_unknown_fields_are_accepted_and_content_parts_flatten():
    req = decode_body(b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},'
                      b'{"type": "text", "text": "b"}]}], "store": true, "metadata": {"k": "v"}}',
                      ChatCompletionRequest)
    assert req.messages[0].text() == "ab"
    assert req.stream is False and req.temperature is None


@pytest.mark.parametrize("body, param", [
    (b'{"model": "m", "messages": "hi"}', "messages"),
    (b'{"model": "m", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    (b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
    (b'{"model": "m", "messages": [], "temperature": 1}', "messages"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": "m", "messages": [{"content": "x"}]}', "messages[0].role"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}', "stop"),
])
def test_bad_requests_name_the_param(body, param):
    with pytest.raises(InvalidRequestError) as info:
        decode_body(body, ChatCompletionRequest)
    assert info.value.param == param
    assert info.value.status_code == 400 and info.value.type == "invalid_request_error"


def test_malformed_json_is_a_400():
    with pytest.raises(InvalidRequestError, match="Malformed JSON"):
        decode_body(b'{"model": ', ChatCompletionRequest)


def test_chunk_encoding_omits_unset_fields_and_keeps_literals():
    chunk = ChatCompletionChunk(id="c", created=1, model="m",
                                choices=[ChunkChoice(index=0, delta=ChunkDelta(content="x"))])
    data = msgspec.json.decode(msgspec.json.encode(chunk))
    assert data["object"] == "chat.completion.chunk"
    assert data["choices"][0]["delta"] == {"content": "x"}
    assert "usage" not in data
    chunk.usage = None
    assert msgspec.json.decode(msgspec.json.encode(chunk))["usage"] is None
    assert ChunkDelta().role is UNSET


def test_params_take_request_then_manifest_defaults_then_openai_defaults():
    req = decode_body(b'{"model": "m", "messages": [{"role": "developer", "content": "be brief"},'
                      b'{"role": "user", "content": "x"}], "top_p": 0.5, "stop": "END", "max_tokens": 7}',
                      ChatCompletionRequest)
    params = chat_params(req, {"temperature": 0.3, "top_p": 0.9, "max_tokens": 99})
    assert params.temperature == 0.3 and params.top_p == 0.5
    assert params.stop == ["END"] and params.max_tokens == 7
    assert params.messages[0] == {"role": "system", "content": "be brief"}
    assert chat_params(req, {}).temperature == 1.0


def test_settings_env_then_flags():
    env = {"OMNILOADER_PORT": "9001", "OMNILOADER_API_KEY": "k", "OMNILOADER_THREADS": "3"}
    settings = load_settings({"port": None, "host": "0.0.0.0"}, environ=env)
    assert (settings.port, settings.api_key, settings.threads, settings.host) == (9001, "k", 3, "0.0.0.0")
    assert load_settings({"port": 7}, environ=env).port == 7
    with pytest.raises(SystemExit):
        load_settings({}, environ={"OMNILOADER_PORT": "not-a-number"})
