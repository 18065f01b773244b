"""The app's error paths with a fake adapter: a crash before the first token is a 500 envelope
without internals; a crash after streaming began travels in-band, then [DONE]."""
import msgspec
from litestar.testing import TestClient

from adapters.base import Adapter, Delta
from server.app import create_app
from server.settings import Settings


class BrokenAdapter(Adapter):
    backend = "fake"
    capabilities = frozenset({"chat"})

    def load(self, progress=None):
        pass

    def generate(self, params, cancel):
        if params.messages and params.messages[-1]["content"] == "crash now":
            raise RuntimeError("secret internal detail")
        yield Delta(text="partial")
        raise RuntimeError("secret internal detail")


def client(tmp_path):
    settings = Settings(models_dir=str(tmp_path / "models"), lab_dir=str(tmp_path / "lab"))
    return TestClient(create_app(settings, adapter_factory=BrokenAdapter))


def test_unexpected_error_before_first_token_is_a_500_envelope_without_internals(tmp_path):
    with client(tmp_path) as c:
        r = c.post("/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "crash now"}]})
        assert r.status_code == 500
        assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "internal_error"
        assert "secret" not in r.text and "Traceback" not in r.text


def test_error_after_streaming_began_is_sent_in_band_then_done(tmp_path):
    with client(tmp_path) as c:
        r = c.post("/v1/chat/completions", json={"model": "default", "stream": True,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        error = msgspec.json.decode(events[-2].removeprefix("data: "))
        assert set(error["error"]) == {"message", "type", "param", "code"}
        assert "secret" not in events[-2]
        contents = [msgspec.json.decode(e[6:])["choices"][0]["delta"].get("content") for e in events[:-2]]
        assert contents == ["partial"]


def test_the_router_keeps_serving_after_a_failed_request(tmp_path):
    with client(tmp_path) as c:
        c.post("/v1/chat/completions", json={"model": "default", "messages": [{"role": "user", "content": "crash now"}]})
        r = c.get("/api/models")
        assert {m["id"]: m["state"] for m in r.json()["data"]}["smollm2-135m-instruct"] == "loaded"
        assert c.get("/health").json()["models"] == ["smollm2-135m-instruct"]


def test_missing_capabilities_are_400s_naming_model_and_capability(tmp_path):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with client(tmp_path) as c:
        for path, body, capability in [
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [tool]}, "tools"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                      "response_format": {"type": "json_object"}}, "json_schema"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
            ("/v1/embeddings", {"input": "x"}, "embeddings"),
            ("/v1/completions", {"prompt": "x"}, "completion"),
        ]:
            r = c.post(path, json={"model": "default", **body})
            error = r.json()["error"]
            assert r.status_code == 400 and error["code"] == "capability_not_supported", (path, r.text)
            assert "smollm2-135m-instruct" in error["message"] and capability in error["message"]
