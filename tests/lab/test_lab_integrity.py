"""Every load goes through the same integrity check: a locked model whose files changed is refused
for chat (409) and for the Lab's own copy alike, and nothing else stops serving."""
from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("torch")

from tests.conftest import REPO, LiveServer
from tests.tiny_models import write_tiny_llama_gguf


def _cli(work, *args):
    return subprocess.run([sys.executable, "-m", "server", "models", *args, "--models-dir", str(work / "models"),
                           "--lab-dir", str(work / "lab")], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_a_tampered_locked_model_is_refused_by_chat_and_by_the_lab(tmp_path):
    (tmp_path / "models").mkdir()
    weights = write_tiny_llama_gguf(tmp_path / "models" / "locked-tiny.gguf")
    locked = _cli(tmp_path, "lock", "locked-tiny")
    assert locked.returncode == 0, locked.stderr
    with weights.open("ab") as f:
        f.write(b"tampered")
    live = LiveServer(tmp_path)
    try:
        with httpx.Client(base_url=live.base_url, timeout=120) as http:
            chat = http.post("/v1/chat/completions", json={
                "model": "locked-tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
            assert chat.status_code == 409 and chat.json()["error"]["code"] == "model_hash_mismatch", chat.text
            job = http.post("/lab/snapshot", json={"model": "locked-tiny"})
            assert job.status_code == 202, job.text
            deadline = time.monotonic() + 120
            while (state := http.get(f"/lab/jobs/{job.json()['id']}").json())["status"] not in (
                    "succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, state
                time.sleep(0.1)
            assert state["status"] == "failed" and state["error"]["code"] == "model_hash_mismatch", state
            assert http.get("/lab/models").json()["data"] == []  # nothing was loaded for the Lab
            ok = http.post("/v1/chat/completions", json={
                "model": "default", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    finally:
        live.stop()
