"""The router on real models: the default SmolLM2 and a tiny llama GGUF the test writes."""
import re
import threading
import time

import httpx
import pytest

from tests.conftest import LiveServer
from tests.tiny_models import write_tiny_llama_gguf

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def tiny_models_dir(tmp_path_factory):
    """models/ with a curated manifest for a tiny random llama (context 256)."""
    work = tmp_path_factory.mktemp("router")
    folder = work / "models" / "tiny"
    folder.mkdir(parents=True)
    write_tiny_llama_gguf(folder / "tiny.gguf")
    (folder / "manifest.yaml").write_text("id: tiny\nbackend: llama_cpp\nsource: tiny.gguf\ncontext_length: 256\n"
                                          "capabilities: [chat, completion]\n")
    return work


def serve(work, name, *args):
    models = work / "models"
    target = work / name
    target.mkdir()
    (target / "models").symlink_to(models, target_is_directory=True)
    return LiveServer(target, *args)


def chat(server, model, **extra):
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=120,
                   json={"model": model, "messages": HI, "max_tokens": 4, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def ps(server):
    return {m["id"]: m for m in httpx.get(server.base_url + "/api/ps").json()["models"]}


def metric(server, name, **labels):
    """The value of one Prometheus sample (0 when it does not exist yet)."""
    text = httpx.get(server.base_url + "/metrics").text
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


@pytest.fixture(scope="module")
def roomy(tiny_models_dir):
    live = serve(tiny_models_dir, "roomy", "--max-queue", "1")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def tight(tiny_models_dir):
    live = serve(tiny_models_dir, "tight", "--max-memory", "400M")
    yield live
    live.stop()


def test_two_models_resident_together_and_metrics_move(roomy):
    before = metric(roomy, "omniloader_completion_tokens_total", model="tiny")
    requests_before = metric(roomy, "omniloader_requests_total", endpoint="/v1/chat/completions", model="tiny",
                             status="200")
    a, b = chat(roomy, "default"), chat(roomy, "tiny", ignore_eos=True)
    assert a["model"] == "smollm2-135m-instruct" and b["model"] == "tiny"
    running = ps(roomy)
    assert set(running) == {"smollm2-135m-instruct", "tiny"}
    assert running["tiny"]["memory_bytes"] < running["smollm2-135m-instruct"]["memory_bytes"]
    assert all(m["active"] == 0 and m["queued"] == 0 for m in running.values())
    assert metric(roomy, "omniloader_completion_tokens_total", model="tiny") == before + 4
    assert metric(roomy, "omniloader_requests_total", endpoint="/v1/chat/completions", model="tiny",
                  status="200") == requests_before + 1
    assert metric(roomy, "omniloader_time_to_first_token_seconds_count", model="tiny") >= 1
    assert metric(roomy, "omniloader_resident_models") == 2


def test_budget_for_one_evicts_the_idle_model(tight):
    chat(tight, "default")
    assert set(ps(tight)) == {"smollm2-135m-instruct"}
    chat(tight, "tiny")
    assert set(ps(tight)) == {"tiny"}  # the default did not fit beside it: evicted while idle
    assert metric(tight, "omniloader_model_evictions_total", model="smollm2-135m-instruct", reason="evicted") == 1
    chat(tight, "default")  # and it comes back on demand
    assert set(ps(tight)) == {"smollm2-135m-instruct"}
    budget = httpx.get(tight.base_url + "/api/system").json()["memory_budget_bytes"]
    assert budget == 400 << 20


def test_keep_alive_zero_unloads_and_a_short_one_expires(roomy):
    chat(roomy, "tiny", keep_alive=0)
    assert "tiny" not in ps(roomy)
    chat(roomy, "tiny", keep_alive="2s")
    entry = ps(roomy)["tiny"]
    assert entry["keep_alive"] == 2.0 and entry["expires_at"] is not None
    deadline = time.monotonic() + 10
    while "tiny" in ps(roomy) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert "tiny" not in ps(roomy)
    assert metric(roomy, "omniloader_model_evictions_total", model="tiny", reason="expired") >= 1
    bad = httpx.post(roomy.base_url + "/v1/chat/completions", json={"model": "tiny", "messages": HI,
                                                                    "keep_alive": "soon"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"


def test_full_queue_is_503_with_retry_after_and_a_gone_client_leaves_it(roomy):
    long = {"model": "default", "messages": HI, "max_tokens": 400, "ignore_eos": True, "stream": True}
    holder = httpx.Client(timeout=120)
    with holder.stream("POST", roomy.base_url + "/v1/chat/completions", json=long) as stream:
        lines = stream.iter_lines()  # kept: a dropped httpx line iterator closes the response
        next(lines)  # the slot is taken and generating
        queued = threading.Thread(target=lambda: httpx.post(
            roomy.base_url + "/v1/chat/completions", json={**long, "stream": False, "max_tokens": 2}, timeout=120))
        queued.start()
        deadline = time.monotonic() + 10
        while ps(roomy)["smollm2-135m-instruct"]["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ps(roomy)["smollm2-135m-instruct"]["queued"] == 1
        full = httpx.post(roomy.base_url + "/v1/chat/completions", json={**long, "stream": False}, timeout=30)
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
    holder.close()  # the first client leaves: its generation stops and the queued one runs
    queued.join(timeout=60)
    assert not queued.is_alive()
    # A client that gives up while queued leaves the queue.
    with httpx.Client(timeout=120) as c, c.stream("POST", roomy.base_url + "/v1/chat/completions", json=long) as s:
        lines = s.iter_lines()
        next(lines)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(roomy.base_url + "/v1/chat/completions", json={**long, "stream": False}, timeout=1.0)
        deadline = time.monotonic() + 5
        while ps(roomy)["smollm2-135m-instruct"]["queued"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ps(roomy)["smollm2-135m-instruct"]["queued"] == 0


def test_load_streams_progress_events(roomy):
    httpx.post(roomy.base_url + "/api/models/tiny/unload")
    with httpx.stream("POST", roomy.base_url + "/api/models/tiny/load?stream=true", timeout=60) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    progress = [json.loads(e) for e in events[:-1]]
    assert progress[0]["status"] == "loading" and progress[-1] == {**progress[-1], "status": "loaded", "progress": 1.0}
    fractions = [p["progress"] for p in progress]
    assert fractions == sorted(fractions) and len(fractions) >= 3
    assert "tiny" in ps(roomy)


def test_health_ready_and_a_missing_default_is_not_ready(tiny_models_dir, roomy):
    assert httpx.get(roomy.base_url + "/health/ready").status_code == 200
    (tiny_models_dir / "models" / "ghost").mkdir(exist_ok=True)
    (tiny_models_dir / "models" / "ghost" / "manifest.yaml").write_text(
        "id: ghost\nbackend: llama_cpp\nsource: missing.gguf\n")
    ghost = serve(tiny_models_dir, "ghost", "--default-model", "ghost")
    try:
        r = httpx.get(ghost.base_url + "/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "not_ready"
        assert httpx.get(ghost.base_url + "/health").status_code == 200
    finally:
        ghost.stop()


def test_a_locked_model_whose_file_changed_refuses_to_load(tiny_models_dir, roomy):
    import shutil
    import subprocess
    import sys

    folder = tiny_models_dir / "models" / "locked"
    folder.mkdir()
    shutil.copy(tiny_models_dir / "models" / "tiny" / "tiny.gguf", folder / "locked.gguf")
    (folder / "manifest.yaml").write_text("id: locked\nbackend: llama_cpp\nsource: locked.gguf\ncontext_length: 256\n")
    rescanned = httpx.post(roomy.base_url + "/api/models/rescan").json()["data"]
    assert "locked" in {m["id"] for m in rescanned}  # hot reload: no restart
    dirs = ["--models-dir", str(roomy.log_path.parent / "models"), "--lab-dir", str(roomy.log_path.parent / "lab")]
    cli = [sys.executable, "-m", "server", "models"]
    lock = subprocess.run([*cli, "lock", "locked", "--set-expected", *dirs], capture_output=True, text=True)
    assert lock.returncode == 0, lock.stderr
    chat(roomy, "locked")
    httpx.post(roomy.base_url + "/api/models/locked/unload")
    with open(folder / "locked.gguf", "ab") as f:
        f.write(b"tampered")
    r = httpx.post(roomy.base_url + "/v1/chat/completions", json={"model": "locked", "messages": HI}, timeout=60)
    assert r.status_code == 409 and r.json()["error"]["code"] == "model_hash_mismatch"
    assert "locked" not in ps(roomy)
    assert subprocess.run([*cli, "verify", "locked", *dirs], capture_output=True).returncode == 2
    chat(roomy, "default")  # everything else keeps serving


def test_cli_load_draws_a_progress_bar_to_completion(roomy):
    import subprocess
    import sys

    httpx.post(roomy.base_url + "/api/models/tiny/unload")
    out = subprocess.run([sys.executable, "-m", "server", "models", "load", "tiny", "--url", roomy.base_url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    frames = [f for f in out.stderr.splitlines() if f.strip()]  # text mode turns each \r into a line
    assert frames[0].startswith("tiny [") and "100.0%" in frames[-1] and "#" * 30 in frames[-1]
    assert "tiny" in ps(roomy)
    missing = subprocess.run([sys.executable, "-m", "server", "models", "load", "nope", "--url", roomy.base_url],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
