"""Model management endpoints, error envelopes and the API key, against live servers."""
import json

import httpx
import openai
import pytest

from tests.conftest import LiveServer

KEY = "s3cret-key"


def assert_envelope(resp: httpx.Response, status: int, code=None, param=None, type_=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    if type_ is not None:
        assert body["error"]["type"] == type_
    assert "Traceback" not in resp.text
    return body["error"]


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, default_gguf):
    """A server with an API key and a models folder holding good, loose and broken entries."""
    work = tmp_path_factory.mktemp("keyed")
    models = work / "models"
    (models / "broken").mkdir(parents=True)
    (models / "broken" / "manifest.yaml").write_text("id: broken\nsource: x.gguf\n")
    (models / "typo").mkdir()
    (models / "typo" / "manifest.json").write_text(json.dumps(
        {"id": "typo", "backend": "llama_cpp", "source": "x.gguf", "context_length": "lots"}))
    (models / "curated").mkdir()
    (models / "curated" / "manifest.yaml").write_text(
        f"id: curated-smol\nbackend: llama_cpp\nsource: {default_gguf}\naliases: [cs]\ncontext_length: 512\n"
        "defaults: {temperature: 0}\n")
    (models / "loose-smol.gguf").symlink_to(default_gguf)
    (models / "missing").mkdir()
    (models / "missing" / "manifest.yaml").write_text("id: missing\nbackend: llama_cpp\nsource: nowhere.gguf\n")
    live = LiveServer(work, "--api-key", KEY)
    yield live
    live.stop()


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_api_key_is_required_on_v1_and_api_but_not_health(keyed_server):
    base = keyed_server.base_url
    assert httpx.get(base + "/health").status_code == 200
    for path in ("/v1/models", "/api/models"):
        assert_envelope(httpx.get(base + path), 401, code="invalid_api_key")
        assert_envelope(httpx.get(base + path, headers=auth("wrong")), 401, code="invalid_api_key")
        assert httpx.get(base + path, headers=auth()).status_code == 200
    c = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        c.models.list()


def test_bad_manifests_are_listed_with_their_error_and_good_ones_serve(keyed_server):
    data = httpx.get(keyed_server.base_url + "/api/models", headers=auth()).json()["data"]
    by_id = {m["id"]: m for m in data}
    invalid = [m for m in data if m["state"] == "invalid"]
    assert len(invalid) == 2
    errors = " ".join(m["error"] for m in invalid)
    assert "backend" in errors and "context_length" in errors
    assert all(m["manifest_path"].endswith(("manifest.yaml", "manifest.json")) for m in invalid)
    assert by_id["loose-smol"]["origin"] == "discovered"
    assert by_id["curated-smol"]["aliases"] == ["cs"]
    assert "invalid manifests" in keyed_server.log() and "broken" in keyed_server.log()
    v1 = httpx.get(keyed_server.base_url + "/v1/models", headers=auth()).json()["data"]
    assert {"curated-smol", "loose-smol", "smollm2-135m-instruct"} <= {m["id"] for m in v1}
    assert not any(m["id"].startswith("invalid:") for m in v1)


def test_curated_alias_and_manifest_defaults_apply(keyed_server):
    c = openai.OpenAI(base_url=keyed_server.base_url + "/v1", api_key=KEY, max_retries=0,
                      _strict_response_validation=True)
    msgs = [{"role": "user", "content": "Name a color."}]
    a = c.chat.completions.create(model="cs", messages=msgs, max_tokens=12)  # temperature 0 from the manifest
    b = c.chat.completions.create(model="cs", messages=msgs, max_tokens=12)
    assert a.model == "curated-smol" and a.choices[0].message.content == b.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="cs", messages=msgs, max_tokens=600)
    err = info.value.body
    assert err["code"] == "context_length_exceeded" and "512" in err["message"]


def test_failed_load_is_a_clear_error_and_the_server_keeps_serving(keyed_server):
    base = keyed_server.base_url
    body = {"model": "missing", "messages": [{"role": "user", "content": "x"}]}
    err = assert_envelope(httpx.post(base + "/v1/chat/completions", json=body, headers=auth()), 500,
                          code="model_load_failed")
    assert "nowhere.gguf" in err["message"]
    state = {m["id"]: m for m in httpx.get(base + "/api/models", headers=auth()).json()["data"]}["missing"]
    assert state["state"] == "failed" and "nowhere.gguf" in state["error"]
    ok = httpx.post(base + "/v1/chat/completions", headers=auth(), timeout=60,
                    json={"model": "loose-smol", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_error_envelopes(server):
    base = server.base_url
    chat = base + "/v1/chat/completions"
    err = assert_envelope(httpx.post(chat, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
                          404, code="model_not_found", param="model", type_="invalid_request_error")
    assert "nope" in err["message"]
    assert_envelope(httpx.post(chat, content=b'{"model": "default", "messages": [', headers={
        "content-type": "application/json"}), 400, type_="invalid_request_error")
    assert_envelope(httpx.post(chat, json={"model": "default", "messages": "hello"}), 400, param="messages")
    assert_envelope(httpx.post(chat, json={"model": "default", "messages": [{"role": "user", "content": "x"}],
                                           "max_tokens": "many"}), 400, param="max_tokens")
    assert_envelope(httpx.get(base + "/v1/nothing-here"), 404)
    assert_envelope(httpx.post(base + "/api/models/nope/load"), 404, code="model_not_found")


def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="default", messages=[])
    assert info.value.body["param"] == "messages"


def test_load_unload_and_register_cycle(server, default_gguf):
    base = server.base_url
    r = httpx.post(base + "/api/models/default/load", timeout=60)
    assert r.status_code == 200 and r.json() == {"id": "smollm2-135m-instruct", "state": "loaded"}
    states = {m["id"]: m["state"] for m in httpx.get(base + "/api/models").json()["data"]}
    assert states["smollm2-135m-instruct"] == "loaded"
    assert "smollm2-135m-instruct" in httpx.get(base + "/health").json()["models"]
    r = httpx.post(base + "/api/models/smollm2-135m-instruct/unload")
    assert r.json()["state"] == "unloaded"
    assert httpx.get(base + "/health").json()["models"] == []
    # The next request loads it again.
    r = httpx.post(base + "/v1/chat/completions", timeout=60,
                   json={"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200
    manifest = {"id": "registered-smol", "backend": "llama_cpp", "source": str(default_gguf), "aliases": ["rs"],
                "context_length": 1024}
    r = httpx.post(base + "/api/models/register", json=manifest)
    assert r.status_code == 200 and r.json()["id"] == "registered-smol" and r.json()["state"] == "unloaded"
    assert "registered-smol" in [m["id"] for m in httpx.get(base + "/v1/models").json()["data"]]
    r = httpx.post(base + "/v1/completions", timeout=60,
                   json={"model": "rs", "prompt": "One, two,", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["model"] == "registered-smol"
    assert_envelope(httpx.post(base + "/api/models/register", json={"id": "x"}), 400)
    httpx.post(base + "/api/models/registered-smol/unload")
