"""/lab through a live server on loopback: jobs, their events, cancel, restart, artifacts, snapshots,
and chat that keeps answering while a Lab job works on the same model."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import openai
import pytest

pytest.importorskip("torch")

from tests.conftest import REPO, LiveServer
from tests.tiny_models import write_tiny_llama_dir

TINY = "tiny-hf"
TERMINAL = {"succeeded", "failed", "cancelled", "interrupted"}


def _workdir(root: Path) -> Path:
    write_tiny_llama_dir(root / "models" / "tiny" / "weights")
    (root / "models" / "tiny" / "manifest.yaml").write_text(f"id: {TINY}\nbackend: hf_transformers\nsource: weights\n")
    return root


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    live = LiveServer(_workdir(tmp_path_factory.mktemp("lab-api")))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(lab_server):
    with httpx.Client(base_url=lab_server.base_url, timeout=120) as c:
        yield c


def submit(http, route: str, **body) -> dict:
    response = http.post(route, json=body)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["id"].startswith("job_") and job["object"] == "lab.job"
    return job


def wait(http, job_id: str, statuses=TERMINAL, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/lab/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")


def events(http, job_id: str) -> list[dict]:
    with http.stream("GET", f"/lab/jobs/{job_id}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()  # keep the iterator: dropping it closes the response
        data = [line[6:] for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [msgspec.json.decode(d) for d in data[:-1]]


def test_snapshot_job_streams_progress_and_rollback_verifies(http):
    job = submit(http, "/lab/snapshot", model=TINY, note="before edits")
    stream = events(http, job["id"])
    final = stream[-1]
    assert final["status"] == "succeeded" and final["job"]["result"]["n_tensors"] == 21
    running = [e["progress"] for e in stream if e["status"] == "running" and e["stage"] == "running"]
    assert running == sorted(running), "progress never goes back"
    assert {e["stage"] for e in stream} >= {"loading", "done"}

    listed = http.get("/lab/snapshots", params={"model": TINY}).json()["data"]
    assert [s["id"] for s in listed][:1] == [job["id"]] and listed[0]["note"] == "before edits"
    undo = wait(http, submit(http, "/lab/rollback", model=TINY, snapshot=job["id"])["id"])
    assert undo["status"] == "succeeded", undo
    assert undo["result"]["identical"] is True and undo["result"]["weights_digest"] == listed[0]["weights_digest"]


def test_artifacts_are_listed_served_and_confined(http):
    job = wait(http, submit(http, "/lab/snapshot", model=TINY)["id"])
    [url] = job["artifacts"]
    assert url == f"/lab/artifacts/snapshot/{job['id']}/snapshot.json"
    served = http.get(url)
    assert served.status_code == 200 and served.headers["content-type"].startswith("application/json")
    assert served.json()["weights_digest"] == job["result"]["weights_digest"]
    listing = http.get("/lab/artifacts", params={"job": job["id"]}).json()["data"]
    assert [a["url"] for a in listing] == [url] and listing[0]["bytes"] == len(served.content)
    for bad in ("/lab/artifacts/../jobs.sqlite3", "/lab/artifacts/%2e%2e/jobs.sqlite3", "/lab/artifacts/jobs.sqlite3",
                "/lab/artifacts/store/blobs", f"/lab/artifacts/snapshot/{job['id']}/..%2f..%2fjobs.sqlite3"):
        response = http.get(bad)
        assert response.status_code == 404 and "error" in response.json(), bad


def test_bad_requests_get_openai_errors_and_no_job(http):
    before = len(http.get("/lab/jobs").json()["data"])
    cases = [
        ({"prompt": "x"}, 400, "model"),
        ({"model": "no-such-model"}, 404, "model"),
        ({"model": "victor"}, 400, "model"),  # a custom runner has no torch weights
        ({"model": TINY, "snapshot": "job_nope"}, 404, "snapshot"),
        ({"model": TINY, "snapshot": 7}, 400, "snapshot"),
    ]
    for body, status, param in cases:
        route = "/lab/rollback" if "snapshot" in body else "/lab/snapshot"
        response = http.post(route, json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"] == param
    assert http.post("/lab/snapshot", content=b"[1, 2]").status_code == 400
    assert http.get("/lab/jobs/job_missing").status_code == 404
    assert http.delete("/lab/jobs/job_missing").status_code == 404
    assert len(http.get("/lab/jobs").json()["data"]) == before


def test_jobs_filter_by_status_and_kind(http):
    done = wait(http, submit(http, "/lab/snapshot", model=TINY)["id"])
    snapshots = http.get("/lab/jobs", params={"kind": "snapshot", "status": "succeeded"}).json()["data"]
    assert done["id"] in [j["id"] for j in snapshots]
    assert all(j["kind"] == "snapshot" and j["status"] == "succeeded" for j in snapshots)
    assert done["id"] not in [j["id"] for j in http.get("/lab/jobs", params={"kind": "rollback"}).json()["data"]]
    assert done["id"] not in [j["id"] for j in http.get("/lab/jobs", params={"status": "failed"}).json()["data"]]


@pytest.mark.slow
def test_cancel_queued_and_running_jobs_while_chat_keeps_answering(http, lab_server):
    """The default GGUF takes a few seconds to load into torch: long enough to see a job running,
    a second job queued behind it (one job per model), chat answering meanwhile, and both cancels."""
    first = submit(http, "/lab/snapshot", model="default")
    second = submit(http, "/lab/snapshot", model="default")
    wait(http, first["id"], {"running"})
    assert http.get(f"/lab/jobs/{second['id']}").json()["status"] == "queued"

    with openai.OpenAI(base_url=lab_server.base_url + "/v1", api_key="none", max_retries=0) as client:
        reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=8, temperature=0)
    assert reply.choices[0].message.content
    assert http.get(f"/lab/jobs/{first['id']}").json()["status"] == "running", "chat did not wait for the Lab"

    cancelled = http.delete(f"/lab/jobs/{second['id']}").json()
    assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None
    http.delete(f"/lab/jobs/{first['id']}")
    stopped = wait(http, first["id"])
    assert stopped["status"] == "cancelled" and stopped["result"] is None and stopped["artifacts"] == []
    assert http.get(f"/lab/jobs/{second['id']}").json()["status"] == "cancelled"


@pytest.mark.slow
def test_a_restart_marks_the_running_job_interrupted(tmp_path):
    work = _workdir(tmp_path)
    server = LiveServer(work)
    try:
        # The first Lab request of a fresh server imports torch and reads the model's shape: slow on a busy machine.
        job = httpx.post(server.base_url + "/lab/snapshot", json={"model": "default"}, timeout=120).json()
        with httpx.Client(base_url=server.base_url) as c:
            wait(c, job["id"], {"running"})
        server.process.kill()  # no shutdown hooks: as a crash or power cut would
        server.process.wait(10)
    finally:
        server.stop()
    again = LiveServer(work)
    try:
        with httpx.Client(base_url=again.base_url) as c:
            found = c.get(f"/lab/jobs/{job['id']}").json()
            assert found["status"] == "interrupted" and found["error"]["code"] == "job_interrupted"
            assert found["result"] is None
            assert wait(c, submit(c, "/lab/snapshot", model=TINY)["id"])["status"] == "succeeded"
    finally:
        again.stop()


def test_cli_runs_a_job_with_a_progress_bar(lab_server):
    done = subprocess.run([sys.executable, "-m", "server", "lab", "--url", lab_server.base_url, "run", "snapshot",
                           "--model", TINY, "note=from the cli"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    job = msgspec.json.decode(done.stdout)
    assert job["status"] == "succeeded" and job["spec"]["note"] == "from the cli"
    assert "snapshot succeeded [##############################] 100.0%" in done.stderr
