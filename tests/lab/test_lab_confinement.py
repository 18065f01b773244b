"""Every /lab and /api/models route that turns request text into a path stays inside its folder, against a
live server: `..`, absolute paths, URL-encoded variants and symlinks planted in the Lab folder that point
outside it are 404/400 with the OpenAI error envelope, and nothing outside is ever listed or served.

Requests go out byte for byte through http.client: httpx would normalize `..` segments away before sending."""
from __future__ import annotations

import http.client
import json
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

pytest.importorskip("torch")

from tests.conftest import LiveServer
from tests.lab.test_lab_api import TINY, _workdir, submit, wait

SECRET = "top secret: outside the Lab folder"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A live server with the tiny model, a snapshot and a diagnostics job, and a secret outside its lab dir."""
    root = _workdir(tmp_path_factory.mktemp("confine"))
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text(SECRET)
    (outside / "snapshot.json").write_text(json.dumps({"tensors": {}, "secret": SECRET}))
    live = LiveServer(root)
    with httpx.Client(base_url=live.base_url, timeout=120) as http:
        snap = wait(http, submit(http, "/lab/snapshot", model=TINY)["id"])
        diag = wait(http, submit(http, "/lab/diagnostics/run", model=TINY, sections=["spectra"])["id"])
        assert snap["status"] == diag["status"] == "succeeded", (snap, diag)
        yield {"http": http, "live": live, "lab": root / "lab", "models": root / "models", "outside": outside,
               "snap": snap["id"], "diag": diag["id"]}
    live.stop()


def raw(live: LiveServer, method: str, target: str, body: bytes | None = None) -> tuple[int, bytes]:
    """Send `target` exactly as written (no normalization, no re-encoding)."""
    url = urlsplit(live.base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request(method, target, body=body, headers={"Content-Type": "application/json"} if body else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def refused(live: LiveServer, target: str, statuses=(400, 404), method: str = "GET", body: bytes | None = None):
    status, content = raw(live, method, target, body)
    assert status in statuses, (target, status, content[:300])
    assert SECRET.encode() not in content, target
    error = json.loads(content)["error"]  # the OpenAI envelope
    assert error["message"] and error["type"] == "invalid_request_error", (target, error)
    return status, error


def plant(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink() if link.is_symlink() or link.is_file() else shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=target.is_dir())


def test_artifact_files_are_confined_to_their_job_folder(world):
    live, lab, snap, outside = world["live"], world["lab"], world["snap"], world["outside"]
    plant(lab / "snapshot" / snap / "leak.txt", outside / "secret.txt")  # a file symlink inside a job folder
    plant(lab / "snapshot" / snap / "leakdir", outside)  # a folder symlink inside a job folder
    plant(lab / "snapshot" / snap / "db", lab / "jobs.sqlite3")  # inside the lab dir, outside the job folder
    plant(lab / "snapshot" / snap / "other.md", lab / "diagnostics" / world["diag"] / "report.md")  # another job's
    (lab / "trace").mkdir(exist_ok=True)
    plant(lab / "trace" / "job_planted", outside)  # a symlinked job folder
    good = f"/lab/artifacts/snapshot/{snap}/snapshot.json"
    assert raw(live, "GET", good)[0] == 200
    for target in (
        f"/lab/artifacts/snapshot/{snap}/leak.txt", f"/lab/artifacts/snapshot/{snap}/leakdir/secret.txt",
        f"/lab/artifacts/snapshot/{snap}/db", f"/lab/artifacts/snapshot/{snap}/other.md",
        "/lab/artifacts/../jobs.sqlite3", "/lab/artifacts/%2e%2e/jobs.sqlite3", "/lab/artifacts/%2E%2E%2Fjobs.sqlite3",
        "/lab/artifacts/jobs.sqlite3", "/lab/artifacts/store/blobs", "/lab/artifacts//etc/passwd",
        "/lab/artifacts/%2Fetc%2Fpasswd", f"/lab/artifacts/%2F{outside.as_posix().lstrip('/')}/secret.txt",
        f"/lab/artifacts/snapshot/{snap}/../../jobs.sqlite3", f"/lab/artifacts/snapshot/{snap}/..%2f..%2fjobs.sqlite3",
        f"/lab/artifacts/snapshot/{snap}/%2e%2e/%2e%2e/jobs.sqlite3",
        f"/lab/artifacts/snapshot/{snap}/%2F{outside.as_posix().lstrip('/')}%2Fsecret.txt",
        f"/lab/artifacts/snapshot/{snap}/./snapshot.json", f"/lab/artifacts/snapshot/{snap}/snapshot.json%00.png",
        "/lab/artifacts/trace/job_planted/secret.txt", "/lab/artifacts/..%2F..%2Fsnapshot/x/y",
        f"/lab/artifacts/snapshot/{snap}%2F..%2F..%2Fjobs.sqlite3/x",
    ):
        refused(live, target, statuses=(404,))


def test_artifact_listing_names_only_files_inside_job_folders(world):
    live, http, lab, snap, outside = world["live"], world["http"], world["lab"], world["snap"], world["outside"]
    plant(lab / "snapshot" / snap / "leak.txt", outside / "secret.txt")
    for query in ("kind=../..", "kind=..%2F..", "kind=%2e%2e", "kind=/etc", f"kind={outside.as_posix()}",
                  "kind=snapshot/..", "job=../../x", "job=..%2F..", f"job={snap}/..", "job=/etc",
                  f"kind=snapshot&job={snap}%2F..%2F..", "kind=store", "job=blobs"):
        status, error = refused(live, f"/lab/artifacts?{query}", statuses=(400,))
        assert error["param"] in ("kind", "job"), (query, error)
    listed = http.get("/lab/artifacts").json()["data"]
    paths = {a["path"] for a in listed}
    assert f"snapshot/{snap}/snapshot.json" in paths and f"diagnostics/{world['diag']}/report.md" in paths
    assert not any(name in p for p in paths for name in ("leak", "secret", "planted", "/db", "other.md")), paths
    mine = http.get("/lab/artifacts", params={"kind": "snapshot", "job": snap}).json()["data"]
    assert [a["path"] for a in mine] == [f"snapshot/{snap}/snapshot.json"]
    for a in listed:  # every listed file is served, and is what its folder holds
        assert raw(live, "GET", a["url"])[0] == 200, a


def test_diagnostics_report_markdown_is_not_followed_out(world):
    live, http, lab, diag, outside = world["live"], world["http"], world["lab"], world["diag"], world["outside"]
    report = lab / "diagnostics" / diag / "report.md"
    assert http.get("/lab/diagnostics/report", params={"model": TINY, "format": "markdown"}).status_code == 200
    kept = report.read_bytes()
    plant(report, outside / "secret.txt")
    try:
        status, error = refused(live, f"/lab/diagnostics/report?model={TINY}&format=markdown", statuses=(404,))
        assert error["param"] == "format"
        refused(live, "/lab/diagnostics/report?model=..%2F..%2Fx&format=markdown", statuses=(404,))
    finally:
        report.unlink()
        report.write_bytes(kept)


def test_rollback_snapshot_ids_and_folders_are_confined(world):
    live, http, lab, snap, outside = world["live"], world["http"], world["lab"], world["snap"], world["outside"]
    before = len(http.get("/lab/jobs").json()["data"])
    for snapshot in ("../../outside", "..%2F..%2Fx", "%2e%2e", f"{snap}/../..", f"{snap}/..", "/etc",
                     str(outside), f"../snapshot/{snap}", "snapshot.json", f"{snap}\\..\\..", "C:evil"):
        body = json.dumps({"model": TINY, "snapshot": snapshot}).encode()
        status, error = refused(live, "/lab/rollback", statuses=(404,), method="POST", body=body)
        assert error["param"] == "snapshot", (snapshot, error)
    body = json.dumps({"model": TINY, "snapshot": snap, "snapshot_dir": str(outside)}).encode()
    assert refused(live, "/lab/rollback", statuses=(400,), method="POST", body=body)[1]["param"] == "snapshot_dir"

    manifest = lab / "snapshot" / snap / "snapshot.json"  # a manifest symlinked out of its folder
    kept = manifest.read_bytes()
    plant(manifest, outside / "snapshot.json")
    try:
        body = json.dumps({"model": TINY, "snapshot": snap}).encode()
        assert refused(live, "/lab/rollback", statuses=(404,), method="POST", body=body)[1]["param"] == "snapshot"
    finally:
        manifest.unlink()
        manifest.write_bytes(kept)

    folder, moved = lab / "snapshot" / snap, outside / snap  # the whole snapshot folder symlinked outside
    shutil.move(folder, moved)
    folder.symlink_to(moved, target_is_directory=True)
    try:
        body = json.dumps({"model": TINY, "snapshot": snap}).encode()
        assert refused(live, "/lab/rollback", statuses=(404,), method="POST", body=body)[1]["param"] == "snapshot"
        assert not any(a["job"] == snap for a in http.get("/lab/artifacts").json()["data"])
    finally:
        folder.unlink()
        shutil.move(moved, folder)
    assert len(http.get("/lab/jobs").json()["data"]) == before, "a refused rollback created a job"
    assert wait(http, submit(http, "/lab/rollback", model=TINY, snapshot=snap)["id"])["status"] == "succeeded"


def test_model_routes_and_register_stay_in_the_models_folder(world):
    live, models, outside = world["live"], world["models"], world["outside"]
    for target in ("/api/models/..%2F..%2Fetc/load", "/api/models/%2e%2e/unload", "/api/models/%2Fetc%2Fpasswd/load"):
        refused(live, target, statuses=(404, 405), method="POST")
    (outside / "target").mkdir()
    plant(models / "linked", outside / "target")  # registering this id would write through the link
    for manifest_id in ("linked", "../escape", "/abs", "a/b", "..", "a\\b"):
        body = json.dumps({"id": manifest_id, "backend": "llama_cpp", "source": "x.gguf"}).encode()
        status, error = refused(live, "/api/models/register", statuses=(400,), method="POST", body=body)
        assert error["param"] in ("id", None), (manifest_id, error)
    assert list((outside / "target").iterdir()) == [] and not (outside / "escape").exists()
    assert not (models.parent / "escape").exists()
