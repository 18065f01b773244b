"""Skillpacks through live servers: an aura exported as one zip and imported into a fresh Lab dir
serves the same outputs; a tampered, extended or mismatched pack is refused and leaves nothing
behind; the CLI does the same offline."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from server.lab.auras import AuraStore
from server.registry import Registry
from tests.conftest import REPO, LiveServer

DEFAULT = "smollm2-135m-instruct"
HIDDEN, FF = 576, 1536
ASK = [{"role": "user", "content": "Name three things people keep in a kitchen drawer."}]


def _aura(work: Path) -> None:
    """Aura `drawer` on the default model: a LoRA on three middle layers, a prompt delta and a token bias."""
    registry = Registry(work / "models", lab_dir=work / "lab")
    registry.scan()
    job = work / "job"
    job.mkdir(parents=True)
    rng = np.random.default_rng(7)
    tensors = {}
    for layer in (9, 10, 11):
        tensors[f"layers.{layer}.mlp.down_proj.lora_A"] = (rng.standard_normal((2, FF)) * 0.08).astype(np.float32)
        tensors[f"layers.{layer}.mlp.down_proj.lora_B"] = (rng.standard_normal((HIDDEN, 2)) * 0.08).astype(np.float32)
    save_file(tensors, str(job / "lora.safetensors"), metadata={"rank": "2", "alpha": "2"})
    components = [{"kind": "lora", "file": "lora.safetensors", "rank": 2, "alpha": 2.0, "modules": ["mlp.down_proj"],
                   "layers": [9, 10, 11]},
                  {"kind": "prompt_delta", "text": "Answer in one short line."},
                  {"kind": "token_bias", "bias": {"28": -5.0}}]
    AuraStore(work / "lab" / "auras").write("drawer", registry.get(DEFAULT), components, job,
                                            {"job": "job_made_by_hand", "method": "lora", "report": {"efficacy": 1.0}})


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    work = tmp_path_factory.mktemp("packs-source")
    _aura(work)
    live = LiveServer(work)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("packs-fresh"))
    yield live
    live.stop()


def _answer(live: LiveServer, model: str) -> str:
    r = httpx.post(live.base_url + "/v1/chat/completions", timeout=120, json={
        "model": model, "messages": ASK, "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _rezip(data: bytes, change) -> bytes:
    """The same pack with its files passed through change(name, bytes) -> bytes | None (None drops it)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            content = change(name, src.read(name))
            if content is not None:
                dst.writestr(name, content)
    return out.getvalue()


@pytest.fixture(scope="module")
def pack(source) -> bytes:
    exported = httpx.post(source.base_url + "/lab/skillpacks/export", json={"aura": "drawer"}, timeout=120)
    assert exported.status_code == 200, exported.text
    info = exported.json()
    download = httpx.get(source.base_url + info["url"], timeout=60)
    assert download.status_code == 200 and hashlib.sha256(download.content).hexdigest() == info["sha256"]
    manifest = info["manifest"]
    assert manifest["base"]["id"] == DEFAULT and len(manifest["base"]["sha256"]) == 64
    assert set(manifest["files"]) == {"aura/aura.json", "aura/c1.safetensors", "dataset.jsonl", "evals.json"}
    listed = httpx.get(source.base_url + "/lab/skillpacks", timeout=60).json()["data"]
    assert [p["file"] for p in listed] == [info["file"]]
    return download.content


def test_an_imported_pack_serves_the_same_outputs_in_a_fresh_lab(source, fresh, pack):
    imported = httpx.post(fresh.base_url + "/lab/skillpacks/import", content=pack, timeout=120,
                          headers={"content-type": "application/zip"})
    assert imported.status_code == 201, imported.text
    aura = imported.json()
    assert aura["model"] == f"{DEFAULT}+drawer" and [c["kind"] for c in aura["components"]] == [
        "lora", "prompt_delta", "token_bias"]
    assert aura["history"][-1]["history"][0]["report"] == {"efficacy": 1.0}  # the pack's own history, kept
    theirs, ours = _answer(source, "default+drawer"), _answer(fresh, "default+drawer")
    assert theirs == ours and ours != _answer(fresh, "default")
    again = httpx.post(fresh.base_url + "/lab/skillpacks/import", content=pack, timeout=120)
    assert again.status_code == 409  # the name is taken; ?name= imports it under another
    renamed = httpx.post(fresh.base_url + "/lab/skillpacks/import", params={"name": "drawer-2"}, content=pack,
                         timeout=120)
    assert renamed.status_code == 201 and _answer(fresh, "default+drawer-2") == ours


def _flip_component_byte(name: str, content: bytes) -> bytes:
    if name == "aura/c1.safetensors":
        content = content[:-1] + bytes([content[-1] ^ 1])
    return content


def _other_base(name: str, content: bytes) -> bytes:
    if name == "aura/aura.json":
        aura = json.loads(content)
        aura["base_sha256"] = "0" * 64
        return json.dumps(aura).encode()
    return content


def _consistent_other_base(data: bytes) -> bytes:
    """A pack that is internally consistent (every hash right) but made on other files of the base."""
    changed = _rezip(data, _other_base)
    with zipfile.ZipFile(io.BytesIO(changed)) as z:
        files = {n: z.read(n) for n in z.namelist()}
    manifest = json.loads(files["skillpack.json"])
    manifest["base"]["sha256"] = "0" * 64
    manifest["files"]["aura/aura.json"] = hashlib.sha256(files["aura/aura.json"]).hexdigest()
    files["skillpack.json"] = json.dumps(manifest).encode()
    return _rezip(changed, lambda n, c: files[n])


@pytest.mark.parametrize("make, status, words", [
    (lambda p: _rezip(p, _flip_component_byte), 400, "changed after export"),
    (lambda p: _rezip(p, lambda n, c: None if n == "dataset.jsonl" else c), 400, "do not match"),
    (lambda p: p[: len(p) // 2], 400, "zip"),  # cut short
    (lambda p: _rezip(p, lambda n, c: c.replace(b'"drawer"', b'"../etc"') if n == "aura/aura.json" else c), 400,
     "changed after export"),
    (_consistent_other_base, 400, "hashes to"),
    (lambda p: b"not a zip at all", 400, "zip"),
])
def test_a_bad_pack_is_refused_and_leaves_nothing(fresh, pack, make, status, words):
    auras_dir = fresh.workdir / "lab" / "auras"
    before = sorted(p.name for p in auras_dir.iterdir()) if auras_dir.is_dir() else []
    r = httpx.post(fresh.base_url + "/lab/skillpacks/import", params={"name": "bad-one"}, content=make(pack),
                   timeout=120)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]
    after = sorted(p.name for p in auras_dir.iterdir()) if auras_dir.is_dir() else []
    assert after == before and "bad-one" not in after


def test_the_cli_exports_and_imports_offline(tmp_path):
    _aura(tmp_path / "a")
    cli = [sys.executable, "-m", "server", "skillpacks"]
    out = subprocess.run([*cli, "export", "drawer", "--lab-dir", str(tmp_path / "a" / "lab"), "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    zip_path = Path(out.stdout.splitlines()[0])
    assert zip_path.parent == tmp_path and zip_path.suffix == ".zip"
    done = subprocess.run([*cli, "import", str(zip_path), "--lab-dir", str(tmp_path / "b" / "lab"),
                           "--models-dir", str(tmp_path / "b" / "models")], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "default" not in done.stderr, done.stderr
    assert (tmp_path / "b" / "lab" / "auras" / "drawer" / "aura.json").is_file()
    tampered = tmp_path / "t.zip"
    tampered.write_bytes(_rezip(zip_path.read_bytes(), _flip_component_byte))
    bad = subprocess.run([*cli, "import", str(tampered), "--name", "t", "--lab-dir", str(tmp_path / "b" / "lab")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "changed after export" in bad.stderr
