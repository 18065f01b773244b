"""vllm_remote: a real OpenAI-compatible peer on loopback (llama-cpp-python's bundled server on the
default GGUF) served through OmniLoader, plus a recording fake remote for the exact request body."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import msgspec
import pytest
from openai import OpenAI

from tests.conftest import REPO, LiveServer, free_port

pytestmark = pytest.mark.slow

# llama.cpp's AMX buffers die with SIGILL on this kind of VM: the peer runs under the same
# plain-CPU-buffer patch the benchmark uses (bench/chat_bench.py PEER). One thread: on a shared
# 2-core machine two llama.cpp threads wait on each other whenever one is descheduled (20x slower).
PEER = ("import sys, runpy; from adapters.llama_cpp import plain_cpu_buffers; keep = plain_cpu_buffers(); "
        "keep.__enter__(); sys.argv[0] = 'llama_cpp.server'; runpy.run_module('llama_cpp.server', run_name='__main__')")
PEER_KEY = "peer-secret"
KEY_ENV = "OMNILOADER_TEST_PEER_KEY"
ASK = [{"role": "user", "content": "Name three colors."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CAPS = "[chat, completion, tools, json_schema, logprobs]"


def _wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"peer exited early:\n{log.read_text(errors='replace')}")
        try:
            if httpx.get(url, timeout=1.0, headers={"Authorization": f"Bearer {PEER_KEY}"}).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"peer not ready:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def peer(tmp_path_factory, default_gguf):
    """`python -m llama_cpp.server` (through the AMX-safe patch) on the default GGUF, key-protected."""
    work = tmp_path_factory.mktemp("peer")
    port = free_port()
    log = work / "peer.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", PEER, "--model", str(default_gguf), "--port", str(port), "--n_ctx", "2048",
             "--n_threads", "1", "--api_key", PEER_KEY], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_http(base + "/models", process, log)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def hanging_port():
    """A socket that listens and never accepts: connections open, requests are never answered."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def write_manifest(models: Path, model_id: str, source: str, params: str) -> None:
    folder = models / model_id
    folder.mkdir(parents=True)
    (folder / "manifest.yaml").write_text(f"id: {model_id}\nbackend: vllm_remote\nsource: {source}\n"
                                          f"capabilities: {CAPS}\nparams: {params}\n")


@pytest.fixture(scope="module")
def live(tmp_path_factory, peer, hanging_port):
    work = tmp_path_factory.mktemp("remote")
    models = work / "models"
    write_manifest(models, "remote-smol", peer, f"{{api_key_env: {KEY_ENV}, timeout: 60}}")
    write_manifest(models, "remote-badkey", peer, "{api_key: wrong-key, timeout: 30}")
    write_manifest(models, "remote-down", f"http://127.0.0.1:{free_port()}/v1", "{timeout: 5}")
    write_manifest(models, "remote-hang", f"http://127.0.0.1:{hanging_port}/v1", "{timeout: 1.5}")
    os.environ[KEY_ENV] = PEER_KEY
    try:
        server = LiveServer(work)
    finally:
        del os.environ[KEY_ENV]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def omni(live):
    with OpenAI(base_url=live.base_url + "/v1", api_key="none", max_retries=0,
                _strict_response_validation=True) as c:
        yield c


@pytest.fixture(scope="module")
def direct(peer):
    with OpenAI(base_url=peer, api_key=PEER_KEY, max_retries=0) as c:
        yield c


def test_chat_answers_what_the_peer_answers_streamed_or_not(omni, direct):
    want = direct.chat.completions.create(model="x", messages=ASK, temperature=0, max_tokens=12)
    got = omni.chat.completions.create(model="remote-smol", messages=ASK, temperature=0, max_tokens=12)
    assert got.model == "remote-smol"
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.choices[0].finish_reason == want.choices[0].finish_reason
    # llama_cpp.server sends no usage in streams: one content chunk per token, prompt unknown (0)
    assert got.usage.completion_tokens == want.usage.completion_tokens
    chunks = list(omni.chat.completions.create(model="remote-smol", messages=ASK, temperature=0, max_tokens=12,
                                               stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == want.choices[0].finish_reason


def test_completion_and_logprobs_come_from_the_peer(omni, direct):
    want = direct.completions.create(model="x", prompt="The sky is", temperature=0, max_tokens=8, logprobs=2)
    got = omni.completions.create(model="remote-smol", prompt="The sky is", temperature=0, max_tokens=8, logprobs=2)
    assert got.choices[0].text == want.choices[0].text
    assert got.choices[0].logprobs.tokens == want.choices[0].logprobs.tokens
    assert got.choices[0].logprobs.token_logprobs == pytest.approx(want.choices[0].logprobs.token_logprobs)
    chat = omni.chat.completions.create(model="remote-smol", messages=ASK, temperature=0, max_tokens=3,
                                        logprobs=True, top_logprobs=2)
    tokens = chat.choices[0].logprobs.content
    assert len(tokens) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)


def test_named_tool_choice_comes_back_as_an_openai_tool_call(omni):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    full = omni.chat.completions.create(model="remote-smol", messages=ask, tools=[WEATHER], tool_choice=choice,
                                        temperature=0, max_tokens=40)
    assert full.choices[0].finish_reason == "tool_calls"
    assert full.choices[0].message.content is None
    (call,) = full.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert isinstance(call.function.arguments, str) and "city" in json.loads(call.function.arguments)
    chunks = list(omni.chat.completions.create(model="remote-smol", messages=ask, tools=[WEATHER],
                                               tool_choice=choice, temperature=0, max_tokens=40, stream=True))
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices[0].delta.tool_calls]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert all(d.function.name is None and d.id is None for d in deltas[1:])  # the peer repeats them: sent once
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_required_is_the_peers_call(omni, direct):
    """llama_cpp.server ignores tool_choice "required" (only a named function is forced): the proxy
    does not paper over that; the client gets exactly what the peer does (a plain text answer)."""
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    want = direct.chat.completions.create(model="x", messages=ask, tools=[WEATHER], tool_choice="required",
                                          temperature=0, max_tokens=16)
    got = omni.chat.completions.create(model="remote-smol", messages=ask, tools=[WEATHER], tool_choice="required",
                                       temperature=0, max_tokens=16)
    assert want.choices[0].message.tool_calls is None
    assert got.choices[0].message.tool_calls is None
    assert got.choices[0].message.content == want.choices[0].message.content


def _error(live, model: str, **extra) -> tuple[int, dict, float]:
    started = time.monotonic()
    r = httpx.post(live.base_url + "/v1/chat/completions", timeout=60,
                   json={"model": model, "messages": ASK, "max_tokens": 4, **extra})
    return r.status_code, r.json(), time.monotonic() - started


def test_unreachable_remote_is_502_and_a_hanging_one_504_within_its_timeout(live):
    status, body, _ = _error(live, "remote-down")
    assert status == 502 and body["error"]["code"] == "backend_unavailable" and body["error"]["type"] == "server_error"
    assert "cannot reach" in body["error"]["message"]
    status, body, elapsed = _error(live, "remote-hang", stream=True)
    assert status == 504 and body["error"]["code"] == "backend_timeout", body
    assert 1.4 <= elapsed < 6, elapsed


def test_remote_refusals_keep_their_status_and_message(live):
    status, body, _ = _error(live, "remote-badkey")
    assert status == 401 and "Remote server for `remote-badkey`" in body["error"]["message"]
    # the peer drops a stream whose prompt overflows its context without a word: a 502, before any byte
    status, body, _ = _error(live, "remote-smol", messages=[{"role": "user", "content": "word " * 2100}])
    assert status == 502 and "ended the stream" in body["error"]["message"]


def test_remote_model_costs_no_memory(live, omni):
    omni.chat.completions.create(model="remote-smol", messages=ASK, max_tokens=1)
    ps = httpx.get(live.base_url + "/api/ps").json()
    (remote,) = [m for m in ps["models"] if m["id"] == "remote-smol"]
    assert remote["backend"] == "vllm_remote" and remote["estimated_bytes"] == 0
    assert remote["memory_bytes"] == remote["measured_bytes"] < (4 << 20)  # the RSS noise of a thread, at most
    listed = {m["id"]: m for m in httpx.get(live.base_url + "/api/models").json()["data"]}
    assert listed["remote-smol"]["backend"] == "vllm_remote" and listed["remote-smol"]["source"].endswith("/v1")


def test_remote_status_lists_the_peers_models_or_says_why_not(peer):
    from adapters.vllm_remote import remote_status
    from server.registry import Manifest

    os.environ[KEY_ENV] = PEER_KEY
    try:
        ok = remote_status(Manifest(id="r", backend="vllm_remote", source=peer, params={"api_key_env": KEY_ENV}))
    finally:
        del os.environ[KEY_ENV]
    assert ok.reachable and len(ok.models) == 1 and ok.models[0].endswith(".gguf")
    down = remote_status(Manifest(id="d", backend="vllm_remote", source=f"http://127.0.0.1:{free_port()}/v1"))
    assert not down.reachable and "ConnectError" in down.error
    missing = remote_status(Manifest(id="m", backend="vllm_remote", source=peer, params={"api_key_env": "NOPE_X"}))
    assert not missing.reachable and "NOPE_X" in missing.error


# --- the exact body sent, against a recording fake remote ------------------------------------

class _Recorder(BaseHTTPRequestHandler):
    bodies: list[dict] = []
    reply: list[dict] = []

    def do_POST(self):  # noqa: N802
        self.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for chunk in self.reply:
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.bodies, _Recorder.reply = [], []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def _adapter(source: str, defaults: dict | None = None):
    from adapters.vllm_remote import VllmRemoteAdapter
    from server.registry import Manifest, ModelRecord

    manifest = Manifest(id="rec", backend="vllm_remote", source=source, defaults=defaults or {},
                        params={"served_model_id": "remote-name", "api_key": "k"})
    adapter = VllmRemoteAdapter(ModelRecord(id="rec", origin="curated", manifest=manifest))
    adapter.load()
    return adapter


def _chat(adapter, body: dict):
    from server.protocol.chat import ChatCompletionRequest
    from server.serving.generation import chat_params

    req = msgspec.json.decode(json.dumps({"model": "rec", **body}), type=ChatCompletionRequest)
    return list(adapter.generate(chat_params(req, adapter.manifest.defaults), threading.Event()))


def test_only_the_fields_the_client_set_are_sent_and_tools_pass_through(recorder):
    call = {"index": 0, "id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": ""}}
    _Recorder.reply = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [call]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}},
    ]
    adapter = _adapter(recorder, defaults={"top_k": 5})
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    deltas = _chat(adapter, {"messages": history, "tools": [WEATHER], "tool_choice": "required", "seed": 3,
                             "response_format": {"type": "json_object"}})
    (sent,) = _Recorder.bodies
    assert sent["model"] == "remote-name" and sent["stream"] is True
    assert sent["messages"] == history  # raw: tool calls and tool turns, no tool prompt added
    assert sent["tools"] == [WEATHER] and sent["tool_choice"] == "required"
    assert sent["response_format"] == {"type": "json_object"}
    assert sent["seed"] == 3 and sent["top_k"] == 5  # set by the client / by the manifest's defaults
    for absent in ("temperature", "top_p", "max_tokens", "stop", "presence_penalty", "frequency_penalty",
                   "logit_bias", "logprobs", "n", "min_p", "repeat_penalty"):
        assert absent not in sent, absent
    pieces = [p for d in deltas for p in d.tool_calls or ()]
    assert pieces[0].id == "call_x" and pieces[0].name == "get_weather"
    assert "".join(p.arguments for p in pieces) == '{"city": "Oslo"}'
    assert deltas[-1].finish_reason == "tool_calls"
    assert (deltas[-1].usage.prompt_tokens, deltas[-1].usage.completion_tokens) == (11, 7)
    adapter.unload()


def test_set_sampling_fields_are_sent_with_their_values(recorder):
    _Recorder.reply = [{"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}]
    adapter = _adapter(recorder)
    deltas = _chat(adapter, {"messages": ASK, "temperature": 0.0, "top_p": 1.0, "max_completion_tokens": 9,
                             "stop": "END", "logit_bias": {"42": -100}, "logprobs": True, "top_logprobs": 2})
    (sent,) = _Recorder.bodies
    assert sent["temperature"] == 0.0 and sent["top_p"] == 1.0 and sent["max_tokens"] == 9  # defaults, but asked for
    assert sent["stop"] == ["END"] and sent["logit_bias"] == {"42": -100}
    assert sent["logprobs"] is True and sent["top_logprobs"] == 2
    assert "".join(d.text for d in deltas) == "hi" and deltas[-1].usage.completion_tokens == 1
    adapter.unload()
