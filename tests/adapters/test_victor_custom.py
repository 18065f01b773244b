"""victor_custom: a user's runner.py in its own process. The example Victor model is trained here
(fast settings), served through a live server and the openai SDK, and checked against the same
weights run in-process; broken runners (crash, hang, memory blow-up, exceptions, failing init)
cost one request each and the next one is served by a fresh process."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import REPO, LiveServer

pytestmark = pytest.mark.slow

VICTOR = REPO / "victor"
FAST_STEPS = "150"
HELLO = [{"role": "user", "content": "Four score and seven years"}]

BROKEN_RUNNER = '''
import os, time

def init(config):
    pass

def infer(messages, params):
    text = messages[-1]["content"]
    if text == "crash":
        os._exit(7)
    if text == "hang":
        time.sleep(3600)
    if text == "oom":
        hog = bytearray(2 << 30)  # over the 512M address-space limit: MemoryError
    if text == "raise":
        raise ValueError("the runner refuses")
    yield f"pid={os.getpid()} "
    while text == "forever":  # ignores max_tokens and never ends
        yield "x"
        time.sleep(0.01)
    if text == "crash-late":
        os._exit(9)
    yield "echo:" + text
'''


def train(folder: Path, seed: int) -> None:
    subprocess.run([sys.executable, str(VICTOR / "train.py"), "--config", str(folder / "config.yaml"),
                    "--steps", FAST_STEPS, "--seed", str(seed)], check=True, capture_output=True, timeout=300)


def in_process(folder: Path, messages: list[dict], **params) -> str:
    """The same weights through runner.py's model, in this process (no server, no worker)."""
    spec = importlib.util.spec_from_file_location(f"victor_runner_{time.monotonic_ns()}", folder / "runner.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    runner.init({"root": str(folder), "threads": 1})
    return "".join(p for p in runner.infer(messages, {"mode": "chat", **params}) if isinstance(p, str))


def manifest(models: Path, model_id: str, source: Path, caps: str, params: str) -> None:
    (models / model_id).mkdir(parents=True)
    (models / model_id / "manifest.yaml").write_text(
        f"id: {model_id}\nbackend: victor_custom\nsource: {source}\ncapabilities: {caps}\nparams: {params}\n")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("victor")
    mine = work / "my-victor"  # a user's copy of the contract folder, trained with fast settings
    shutil.copytree(VICTOR, mine, ignore=shutil.ignore_patterns("weights", "__pycache__", "*.pyc"))
    train(mine, seed=1)
    broken = work / "broken"
    broken.mkdir()
    (broken / "runner.py").write_text(BROKEN_RUNNER)
    badinit = work / "badinit"
    badinit.mkdir()
    (badinit / "runner.py").write_text("def init(config):\n    raise RuntimeError('no weights here')\n\n"
                                       "def infer(messages, params):\n    yield 'never'\n")
    models = work / "models"
    manifest(models, "my-victor", mine, "[chat, completion]", "{timeout: 60, max_memory: 3G}")
    manifest(models, "broken", broken, "[chat]", "{timeout: 2, max_memory: 512M}")
    manifest(models, "badinit", badinit, "[chat]", "{}")
    return work


@pytest.fixture(scope="module")
def live(work):
    server = LiveServer(work)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sdk(live):
    with OpenAI(base_url=live.base_url + "/v1", api_key="none", max_retries=0,
                _strict_response_validation=True) as c:
        yield c


def test_victor_answers_with_its_own_weights_streamed_or_not(work, sdk):
    folder = work / "my-victor"
    want = in_process(folder, HELLO, max_tokens=24, temperature=0)
    assert want.strip()
    got = sdk.chat.completions.create(model="my-victor", messages=HELLO, max_tokens=24, temperature=0)
    assert got.choices[0].message.content == want
    assert got.usage.prompt_tokens == len(HELLO[0]["content"]) + 1  # bytes, and the newline the runner adds
    assert got.usage.completion_tokens == len(want.encode()) or got.choices[0].finish_reason == "stop"
    chunks = list(sdk.chat.completions.create(model="my-victor", messages=HELLO, max_tokens=24, temperature=0,
                                              stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = sdk.completions.create(model="my-victor", prompt="Alice was", max_tokens=12, temperature=0)
    assert len(text.choices[0].text.encode()) <= 12 and text.usage.prompt_tokens == len("Alice was")


def test_the_runners_tokenizer_serves_the_tokenize_endpoint(live):
    r = httpx.post(live.base_url + "/api/models/my-victor/tokenize", json={"text": "hé", "with_pieces": True})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == [104, 195, 169]  # Victor reads bytes
    r = httpx.post(live.base_url + "/api/models/my-victor/detokenize", json={"tokens": [104, 195, 169]})
    assert r.json()["text"] == "hé"


def test_retraining_with_another_seed_changes_what_it_says(work, live, sdk):
    folder = work / "my-victor"
    before = sdk.chat.completions.create(model="my-victor", messages=HELLO, max_tokens=24,
                                         temperature=0).choices[0].message.content
    train(folder, seed=2)
    assert httpx.post(live.base_url + "/api/models/my-victor/unload").json()["state"] == "unloaded"
    after = sdk.chat.completions.create(model="my-victor", messages=HELLO, max_tokens=24,
                                        temperature=0).choices[0].message.content
    assert after != before
    assert after == in_process(folder, HELLO, max_tokens=24, temperature=0)


def test_what_the_runner_cannot_do_is_a_400(sdk):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra, param in (({"tools": tools}, "tools"), ({"logprobs": True}, "logprobs"),
                         ({"response_format": {"type": "json_object"}}, "response_format")):
        with pytest.raises(openai.BadRequestError) as info:
            sdk.chat.completions.create(model="my-victor", messages=HELLO, max_tokens=4, **extra)
        assert info.value.body["code"] == "capability_not_supported" and info.value.body["param"] == param
    with pytest.raises(openai.BadRequestError):
        sdk.embeddings.create(model="my-victor", input="hi")
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model="broken", prompt="hi")  # its manifest declares chat only
    assert info.value.body["code"] == "capability_not_supported"


def ask(live, text: str, **extra) -> httpx.Response:
    return httpx.post(live.base_url + "/v1/chat/completions", timeout=60,
                      json={"model": "broken", "messages": [{"role": "user", "content": text}], **extra})


def pid_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["message"]["content"]
    assert content.endswith("echo:hi")
    return content.split()[0]


def test_crash_hang_and_memory_blowup_cost_one_request_then_a_fresh_process_serves(live):
    first = pid_of(ask(live, "hi"))
    crashed = ask(live, "crash")
    assert crashed.status_code == 500 and crashed.json()["error"]["code"] == "runner_crashed"
    assert "exited with code 7" in crashed.json()["error"]["message"]
    second = pid_of(ask(live, "hi"))
    assert second != first

    started = time.monotonic()
    hung = ask(live, "hang")
    assert hung.status_code == 504 and hung.json()["error"]["code"] == "backend_timeout", hung.text
    assert time.monotonic() - started < 8
    third = pid_of(ask(live, "hi"))
    assert third != second

    blown = ask(live, "oom")
    assert blown.status_code == 500 and blown.json()["error"]["code"] == "runner_out_of_memory", blown.text
    assert "MemoryError" in blown.json()["error"]["message"]
    fourth = pid_of(ask(live, "hi"))
    assert fourth != third

    raised = ask(live, "raise")  # an exception is that request's error; the process lives on
    assert raised.status_code == 500 and raised.json()["error"]["code"] == "runner_error"
    assert "ValueError: the runner refuses" in raised.json()["error"]["message"]
    assert pid_of(ask(live, "hi")) == fourth


def test_a_runner_that_never_stops_is_cut_at_max_tokens_and_stays_in_step(live):
    pid = pid_of(ask(live, "hi"))
    r = ask(live, "forever", max_tokens=5)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == f"{pid} xxxx"
    assert pid_of(ask(live, "hi")) == pid  # cancelled between two pieces, not killed


def test_a_crash_mid_stream_is_an_in_band_error_then_done(live):
    with httpx.stream("POST", live.base_url + "/v1/chat/completions", timeout=60,
                      json={"model": "broken", "stream": True,
                            "messages": [{"role": "user", "content": "crash-late"}]}) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "runner_crashed" and "exited with code 9" in error["message"]
    assert json.loads(events[0])["choices"][0]["delta"]["content"].startswith("pid=")
    pid_of(ask(live, "hi"))


def test_a_runner_whose_init_fails_is_a_load_error_and_others_keep_serving(live):
    r = httpx.post(live.base_url + "/v1/chat/completions", timeout=60,
                   json={"model": "badinit", "messages": HELLO})
    assert r.status_code == 500 and r.json()["error"]["code"] == "model_load_failed"
    assert "RuntimeError: no weights here" in r.json()["error"]["message"]
    pid_of(ask(live, "hi"))


def test_the_registry_scans_the_victor_folder(tmp_path):
    from server.registry import Registry

    reg = Registry(tmp_path, victor_dir=VICTOR)
    reg.scan()
    victor = reg.get("victor")
    assert victor.manifest.backend == "victor_custom" and victor.source_path().resolve() == VICTOR
    assert "victor" not in {r.id for r in reg.candidates("chat")}  # a demo: never picked for role:chat
    hidden = Registry(tmp_path, victor_dir=None)
    hidden.scan()
    assert "victor" not in {r.id for r in hidden.records()}


def _lab_job(live, route: str, body: dict) -> dict:
    job = httpx.post(live.base_url + route, json=body, timeout=60)
    assert job.status_code == 202, job.text
    deadline = time.monotonic() + 120
    while (state := httpx.get(f"{live.base_url}/lab/jobs/{job.json()['id']}", timeout=60).json())["status"] in (
            "queued", "running"):
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    return state


def test_the_lab_calls_the_runners_own_functions_in_its_process(live, sdk):
    """The Victor contract's Lab functions run in the runner's process; what a runner lacks is a 400."""
    trace = _lab_job(live, "/lab/trace", {"model": "my-victor", "prompt": "Alice was"})
    assert trace["status"] == "succeeded", trace
    assert [row["byte"] for row in trace["result"]["result"]] == list("lice was")
    assert all(0.0 <= row["p"] <= 1.0 for row in trace["result"]["result"])
    causal = _lab_job(live, "/lab/causal_test", {"model": "my-victor", "prompt": "Alice was", "answer": " a"})
    assert causal["status"] == "succeeded" and [e["layer"] for e in causal["result"]["layers"]] == [0, 1]
    diagnostics = _lab_job(live, "/lab/diagnostics/run", {"model": "my-victor"})
    assert diagnostics["result"]["parameters"] > 10_000
    taught = _lab_job(live, "/lab/train/target", {"model": "my-victor", "prompt": "The sky is", "target": " green",
                                                  "steps": 15})
    assert taught["status"] == "succeeded", taught
    before, after = taught["result"]["target_logprob_before"][0], taught["result"]["target_logprob_after"][0]
    assert after > before + 1.0  # taught in place, in the runner's process
    text = sdk.completions.create(model="my-victor", prompt="The sky is", max_tokens=6, temperature=0)
    assert text.choices[0].text.startswith(" green")
    for route, missing in (("/lab/trace", "trace"), ("/lab/causal_test", "causal_test")):
        refused = httpx.post(live.base_url + route, json={"model": "broken", "prompt": "x"}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "model", refused.text
        assert f"`{missing}`" in refused.json()["error"]["message"]
    snapshot = httpx.post(live.base_url + "/lab/snapshot", json={"model": "my-victor"}, timeout=60)
    assert snapshot.status_code == 400 and "custom runner" in snapshot.json()["error"]["message"]
