"""`omniloader models ...` as a user runs it (subprocesses on a tmp models folder), and the
/api/models/select and /rescan routes plus `model: "role:chat"` on live servers."""
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, LiveServer


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def aggregate(name: str, file_sha: str) -> str:
    """The documented aggregate for a one-file model: sha256 of its `sha256sum` line."""
    return hashlib.sha256(f"{file_sha}  {name}\n".encode()).hexdigest()


@pytest.fixture(scope="module")
def gguf_sha(default_gguf) -> str:
    return sha256_file(default_gguf)


@pytest.fixture(scope="module")
def work(tmp_path_factory, default_gguf) -> Path:
    """models/: the default GGUF symlinked as a loose file, and a curated manifest with tools."""
    work = tmp_path_factory.mktemp("cli")
    models = work / "models"
    models.mkdir()
    (models / "loose-smol.gguf").symlink_to(default_gguf)
    (models / "tooled").mkdir()
    (models / "tooled" / "manifest.yaml").write_text(
        f"id: tooled-smol\nbackend: llama_cpp\nsource: {default_gguf}\nroles: [chat]\n"
        "capabilities: [chat, tools, vision]\n")
    return work


def cli(work: Path, *args: str, env: dict | None = None, dirs: bool = True) -> subprocess.CompletedProcess:
    flags = ["--models-dir", str(work / "models"), "--lab-dir", str(work / "lab")] if dirs else []
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OMNILOADER_")}
    return subprocess.run([sys.executable, "-m", "server", "models", *args, *flags], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=60, env={**environ, **(env or {})})


def test_list_json_shows_builtin_discovered_and_curated_models(work):
    out = cli(work, "list", "--json")
    assert out.returncode == 0, out.stderr
    by_id = {m["id"]: m for m in json.loads(out.stdout)}
    # the built-ins (default, all-minilm-l6-v2) and the repo's victor/ example come along
    assert set(by_id) == {"smollm2-135m-instruct", "all-minilm-l6-v2", "victor", "loose-smol", "tooled-smol"}
    assert by_id["all-minilm-l6-v2"]["origin"] == "builtin" and by_id["all-minilm-l6-v2"]["roles"] == ["embed"]
    assert by_id["smollm2-135m-instruct"]["default"] and by_id["smollm2-135m-instruct"]["origin"] == "builtin"
    assert by_id["loose-smol"]["origin"] == "discovered" and by_id["loose-smol"]["backend"] == "llama_cpp"
    assert by_id["tooled-smol"]["capabilities"] == ["chat", "tools", "vision"]
    role = cli(work, "list", "--role", "chat")  # text, in the order role:chat tries them
    ids = [line.split()[0] for line in role.stdout.splitlines()[1:-1]]
    assert ids == ["smollm2-135m-instruct", "tooled-smol", "loose-smol"]


def test_select_explains_its_choice_and_fails_with_exit_1(work):
    out = cli(work, "select", "role:chat", "--require", "vision", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["model"] == "tooled-smol" and "first curated model" in result["reason"]
    assert result["rejected"] == [{"id": "smollm2-135m-instruct", "reason": "lacks vision (capabilities: chat, "
                                   "completion, tools, json_schema, logprobs, embeddings)"}]
    none = cli(work, "select", "role:chat", "--require", "audio")
    assert none.returncode == 1 and none.stdout == ""
    assert "No model qualifies for `role:chat with audio`" in none.stderr
    assert "rejected tooled-smol: lacks audio" in none.stderr


def test_verify_prints_and_records_the_sha256_of_a_symlinked_gguf(work, gguf_sha):
    out = cli(work, "verify", "loose-smol")
    assert out.returncode == 0, out.stderr
    expected = aggregate("loose-smol.gguf", gguf_sha)
    lines = out.stdout.splitlines()
    assert lines[0] == f"{expected}  loose-smol"
    assert f"  {gguf_sha}  loose-smol.gguf" in lines
    listed = {m["id"]: m for m in json.loads(cli(work, "list", "--json").stdout)}
    state = listed["loose-smol"]["state"]
    assert state["sha256"] == expected and state["verified_at"] > 0 and not state["locked"]
    assert state["files"] == [{"path": "loose-smol.gguf", "size": (work / "models" / "loose-smol.gguf").stat().st_size,
                               "sha256": gguf_sha}]


def test_a_locked_copy_that_changes_fails_verify_with_exit_2(work, default_gguf, gguf_sha):
    copy = work / "models" / "copy-smol.gguf"
    shutil.copyfile(default_gguf, copy)
    locked = cli(work, "lock", "copy-smol", "--json")
    assert locked.returncode == 0, locked.stderr
    pinned = aggregate("copy-smol.gguf", gguf_sha)
    assert json.loads(locked.stdout)["expected_sha256"] == pinned and json.loads(locked.stdout)["locked"]
    ok = cli(work, "verify", "copy-smol", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"]
    with copy.open("ab") as f:
        f.write(b"tampered")
    tampered = aggregate("copy-smol.gguf", sha256_file(copy))
    bad = cli(work, "verify", "copy-smol")
    assert bad.returncode == 2
    assert bad.stdout.splitlines()[0] == f"{tampered}  copy-smol"
    assert f"locked to {pinned}: MISMATCH" in bad.stdout and "refuse to load" in bad.stderr
    unlocked = cli(work, "unlock", "copy-smol")
    assert unlocked.returncode == 0 and unlocked.stdout.startswith("unlocked copy-smol")
    repinned = cli(work, "lock", "copy-smol", "--set-expected", "--json")
    assert json.loads(repinned.stdout)["expected_sha256"] == tampered
    assert cli(work, "verify", "copy-smol").returncode == 0


def test_show_reads_the_gguf_header_without_loading_weights(work, default_gguf):
    out = cli(work, "show", "default", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["id"] == "smollm2-135m-instruct" and info["manifest"]["backend"] == "llama_cpp"
    with default_gguf.open("rb") as f:
        magic, _version, tensor_count = struct.unpack("<4sIQ", f.read(16))
    assert magic == b"GGUF"
    assert info["gguf"] == {"architecture": "llama", "context_length": 8192, "quantization": "Q4_1",
                            "chat_template": True, "tensor_count": tensor_count,
                            "file_size": default_gguf.stat().st_size}
    text = cli(work, "show", "loose-smol")
    assert "quantization: Q4_1" in text.stdout and "backend: llama_cpp" in text.stdout


def test_settings_come_from_the_environment_and_unknown_ids_exit_1(work):
    env = {"OMNILOADER_MODELS_DIR": str(work / "models"), "OMNILOADER_LAB_DIR": str(work / "lab")}
    out = cli(work, "select", "tooled-smol", env=env, dirs=False)
    assert out.returncode == 0 and out.stdout.startswith("model: tooled-smol\n"), out.stderr
    missing = cli(work, "verify", "no-such-model")
    assert missing.returncode == 1 and "`no-such-model` does not exist" in missing.stderr


@pytest.fixture(scope="module")
def live(tmp_path_factory, default_gguf):
    work = tmp_path_factory.mktemp("select-live")
    (work / "models" / "tooled").mkdir(parents=True)
    (work / "models" / "tooled" / "manifest.yaml").write_text(
        f"id: tooled-smol\nbackend: llama_cpp\nsource: {default_gguf}\ncapabilities: [chat, tools, json_schema, vision]\n")
    server = LiveServer(work)
    yield server, work
    server.stop()


def test_select_route_answers_with_model_reason_and_rejections(live):
    server, _ = live
    url = server.base_url + "/api/models/select"
    r = httpx.get(url, params={"role": "chat", "require": "tools,vision"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tooled-smol" and "has tools, vision" in body["reason"]
    assert [x["id"] for x in body["rejected"]] == ["smollm2-135m-instruct"]
    repeated = httpx.get(url, params=[("role", "chat"), ("require", "tools"), ("require", "vision")])
    assert repeated.json() == body
    assert httpx.get(url, params={"name": "smollm2"}).json()["model"] == "smollm2-135m-instruct"
    none = httpx.get(url, params={"name": "role:chat", "require": "audio"})
    assert none.status_code == 404 and none.json()["error"]["code"] == "model_not_found"
    assert "lacks audio" in none.json()["error"]["message"]
    both = httpx.get(url, params={"name": "x", "role": "chat"})
    assert both.status_code == 400 and both.json()["error"]["param"] == "name"


def test_rescan_hot_reloads_the_models_folder(live, default_gguf):
    server, work = live
    before = {m["id"] for m in httpx.get(server.base_url + "/api/models").json()["data"]}
    assert "late-smol" not in before
    (work / "models" / "late-smol.gguf").symlink_to(default_gguf)
    r = httpx.post(server.base_url + "/api/models/rescan")
    assert r.status_code == 200, r.text
    after = {m["id"]: m for m in r.json()["data"]}
    assert after["late-smol"]["origin"] == "discovered" and set(after) == before | {"late-smol"}
    assert "late-smol" in {m["id"] for m in httpx.get(server.base_url + "/v1/models").json()["data"]}


def test_role_chat_works_as_the_model_of_a_chat_completion(client):
    reply = client.chat.completions.create(model="role:chat", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=3, temperature=0)
    assert reply.model == "smollm2-135m-instruct" and reply.usage.completion_tokens >= 1
