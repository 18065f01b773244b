"""The aura store (server/lab/auras): writing a job's components, composing, deleting, the hash and
base checks, confinement, atomic writes, what AuraOverlay does to a request, and the CLI. No model
is loaded: bases are records over small files."""
from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import numpy as np
import pytest
from safetensors.numpy import save_file

from adapters.base import GenerateParams
from server.cli.main import main as cli
from server.lab.auras import AuraBaseChanged, AuraBaseMismatch, AuraCorrupt, AuraExists, AuraHashMismatch, \
    AuraNotFound, AuraResolver, AuraStore
from server.lab.auras import store as store_module
from server.protocol.chat import ChatCompletionRequest
from server.registry import Manifest, ModelRecord
from server.registry.hashing import hash_model_files


def _record(path: Path, model_id: str) -> ModelRecord:
    path.write_bytes(model_id.encode() * 1000) if not path.exists() else None
    manifest = Manifest(id=model_id, backend="llama_cpp", source=str(path))
    return ModelRecord(id=model_id, origin="curated", manifest=manifest, manifest_path=None)


@pytest.fixture
def env(tmp_path):
    job = tmp_path / "lab" / "train_target" / "job_1"
    job.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"layers.2.mlp.down_proj.lora_A": rng.standard_normal((2, 16)).astype(np.float32),
               "layers.2.mlp.down_proj.lora_B": rng.standard_normal((8, 2)).astype(np.float32)},
              str(job / "delta.safetensors"), metadata={"rank": "2", "alpha": "4"})
    save_file({"vector": rng.standard_normal(8).astype(np.float32)}, str(job / "steer.safetensors"))
    base = _record(tmp_path / "base.gguf", "base-model")
    other = _record(tmp_path / "other.gguf", "other-model")
    return tmp_path, job, AuraStore(tmp_path / "lab" / "auras"), base, other


LORA = {"kind": "lora", "file": "delta.safetensors", "rank": 2, "alpha": 4.0, "modules": ["mlp.down_proj"],
        "layers": [2]}
STEER = {"kind": "steering", "file": "steer.safetensors", "layer": 3, "coefficient": 2.0, "weight": 0.5}
PROMPT = {"kind": "prompt_delta", "text": "Paris is the capital of Italy."}
BIAS = {"kind": "token_bias", "bias": {"42": 60.0, "7": -3.0}, "weight": 2.0}


def test_write_copies_and_hashes_the_components_and_records_the_base(env):
    tmp, job, store, base, _ = env
    aura = store.write("capitals", base, [LORA, STEER, PROMPT, BIAS], job,
                       {"job": "job_1", "method": "lora", "report": {"efficacy": 1.0}})
    folder = tmp / "lab" / "auras" / "capitals"
    assert [c.id for c in aura.components] == ["c1", "c2", "c3", "c4"]
    assert [c.file for c in aura.components] == ["c1.safetensors", "c2.safetensors", None, None]
    for c, src in zip(aura.components[:2], ["delta.safetensors", "steer.safetensors"]):
        assert (folder / c.file).read_bytes() == (job / src).read_bytes()
        assert c.sha256 == hash_model_files(folder / c.file).files[0].sha256
    assert {c.source_job for c in aura.components} == {"job_1"}
    assert aura.base == "base-model" and aura.base_sha256 == hash_model_files(tmp / "base.gguf").sha256
    stored = json.loads((folder / "aura.json").read_text())
    assert stored["history"][0]["method"] == "lora" and stored["history"][0]["report"] == {"efficacy": 1.0}
    assert sorted(p.name for p in folder.iterdir()) == ["aura.json", "c1.safetensors", "c2.safetensors"]
    assert store.names() == ["capitals"] and store.get("capitals") == aura


def test_write_appends_to_an_aura_of_the_same_base_only(env):
    tmp, job, store, base, other = env
    store.write("facts", base, [PROMPT], job, {"job": "job_1"})
    aura = store.write("facts", base, [LORA], job, {"job": "job_2"})
    assert [c.id for c in aura.components] == ["c1", "c2"] and len(aura.history) == 2
    assert aura.components[1].source_job == "job_2"
    with pytest.raises(AuraBaseMismatch):
        store.write("facts", other, [PROMPT], job, {})
    (tmp / "base.gguf").write_bytes(b"changed weights")
    with pytest.raises(AuraBaseChanged):
        store.write("facts", base, [PROMPT], job, {})


@pytest.mark.parametrize("component, field", [
    ({"kind": "memory"}, "kind"),
    ({**LORA, "modules": ["lm_head"]}, "modules"),
    ({**LORA, "rank": 3}, "rank 2, not 3"),
    ({**LORA, "layers": [1]}, "which `modules`/`layers` do not list"),
    ({**LORA, "file": "../../base.gguf"}, "not a file inside"),
    ({**STEER, "layer": -1}, "layer"),
    ({**BIAS, "bias": {"x": 1.0}}, "not a token id"),
    ({**PROMPT, "weight": float("nan")}, "weight"),
    ({"kind": "prompt_delta", "text": "  "}, "text"),
])
def test_bad_components_are_refused_naming_the_field(env, component, field):
    _tmp, job, store, base, _ = env
    with pytest.raises(ValueError, match=field):
        store.write("x", base, [component], job, {})
    assert store.names() == []


@pytest.mark.parametrize("name", ["Bad", "a/b", "..", "-x", "a" * 65, "", "a+b"])
def test_names_are_checked_before_any_path(env, name):
    _tmp, job, store, base, _ = env
    with pytest.raises(ValueError, match="not a valid aura name"):
        store.write(name, base, [PROMPT], job, {})
    with pytest.raises(AuraNotFound):
        store.get(name)


def test_a_crash_while_writing_leaves_no_half_aura(env, monkeypatch):
    tmp, job, store, base, _ = env
    real = store_module.copy_hashed
    calls = []

    def dies_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(store_module, "copy_hashed", dies_on_second)
    with pytest.raises(OSError):
        store.write("new", base, [LORA, STEER], job, {})
    assert store.names() == []
    assert [p.name for p in (tmp / "lab" / "auras").iterdir()] == [".base-hashes.json"]  # no staging folder left
    monkeypatch.setattr(store_module, "copy_hashed", real)
    before = store.write("old", base, [PROMPT], job, {})
    calls.clear()
    monkeypatch.setattr(store_module, "copy_hashed", dies_on_second)
    with pytest.raises(OSError):
        store.write("old", base, [LORA, STEER], job, {})
    assert store.get("old") == before
    assert sorted(p.name for p in (tmp / "lab" / "auras" / "old").iterdir()) == ["aura.json"]


def test_verified_checks_base_and_component_hashes(env):
    tmp, job, store, base, other = env
    store.write("a", base, [LORA, PROMPT], job, {})
    assert store.verified("a", base).name == "a"
    with pytest.raises(AuraNotFound) as missing:
        store.verified("zzz", base, model="base-model+zzz")
    assert missing.value.status_code == 404 and missing.value.code == "model_not_found"
    assert "zzz" in missing.value.message
    with pytest.raises(AuraBaseMismatch) as wrong:
        store.verified("a", other)
    assert wrong.value.status_code == 400 and "base-model" in wrong.value.message
    lora = tmp / "lab" / "auras" / "a" / "c1.safetensors"
    data = bytearray(lora.read_bytes())
    data[-1] ^= 1
    lora.write_bytes(bytes(data))
    with pytest.raises(AuraHashMismatch) as tampered:
        store.verified("a", base)
    assert tampered.value.status_code == 409 and "c1" in tampered.value.message
    data[-1] ^= 1
    lora.write_bytes(bytes(data))
    assert store.verified("a", base).name == "a"  # restored bytes hash as recorded again
    with (tmp / "base.gguf").open("ab") as f:
        f.write(b"!")
    with pytest.raises(AuraBaseChanged) as changed:
        store.verified("a", base)
    assert changed.value.status_code == 409


def test_stored_paths_are_confined(env, tmp_path):
    tmp, job, store, base, _ = env
    store.write("a", base, [LORA], job, {})
    folder = tmp / "lab" / "auras" / "a"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "aura.json").write_bytes((folder / "aura.json").read_bytes().replace(b'"a"', b'"evil"', 1))
    os.symlink(outside, tmp / "lab" / "auras" / "evil")
    assert store.names() == ["a"]
    with pytest.raises(AuraNotFound):
        store.get("evil")
    raw = json.loads((folder / "aura.json").read_text())
    raw["components"][0]["file"] = "../../../base.gguf"
    (folder / "aura.json").write_text(json.dumps(raw))
    with pytest.raises(AuraCorrupt):
        store.verified("a", base)
    (folder / "aura.json").write_text("{not json")
    with pytest.raises(AuraCorrupt):
        store.get("a")
    assert store.list() == []  # an unreadable aura is left out of listings


def test_compose_from_auras_and_inline_components(env):
    _tmp, job, store, base, other = env
    store.write("one", base, [LORA, PROMPT], job, {})
    store.write("two", base, [BIAS], job, {})
    mix = store.compose("mix", [("one", "c1", 0.5), ("two", None, None)], [{"kind": "prompt_delta", "text": "Hi."}],
                        None)
    assert [(c.kind, c.weight) for c in mix.components] == [("lora", 0.5), ("token_bias", 2.0), ("prompt_delta", 1.0)]
    assert mix.base == "base-model" and mix.components[0].sha256 == store.get("one").components[0].sha256
    assert mix.history[0]["composed_from"] == [{"aura": "one", "id": "c1"}, {"aura": "two", "id": None}]
    with pytest.raises(AuraExists):
        store.compose("mix", [("two", None, None)], [], None)
    store.write("elsewhere", other, [PROMPT], job, {})
    with pytest.raises(AuraBaseMismatch):
        store.compose("bad", [("one", None, None), ("elsewhere", None, None)], [], None)
    with pytest.raises(AuraNotFound) as unknown:
        store.compose("bad", [("nope", None, None)], [], None)
    assert unknown.value.param == "auras"
    inline_only = store.compose("rule", [], [BIAS], base)
    assert inline_only.base_sha256 == store.get("one").base_sha256
    with pytest.raises(Exception, match="cannot be given inline"):
        store.compose("bad", [], [LORA], base)


def test_delete(env):
    tmp, job, store, base, _ = env
    store.write("a", base, [LORA], job, {})
    assert store.delete("a").name == "a"
    assert store.names() == [] and not (tmp / "lab" / "auras" / "a").exists()
    with pytest.raises(AuraNotFound):
        store.delete("a")


def test_overlay_adjusts_the_request(env):
    _tmp, job, store, base, _ = env
    store.write("a", base, [LORA, STEER, PROMPT, BIAS], job, {})
    store.write("b", base, [{"kind": "prompt_delta", "text": "Be brief."}, {**BIAS, "weight": 1.0}], job, {})
    overlay = AuraResolver(store)(base, "a+b")
    assert overlay.name == "a+b"
    chat = GenerateParams(messages=[{"role": "system", "content": "You help."}, {"role": "user", "content": "Q"}],
                          logit_bias={7: 1.5})
    out = overlay.adjust(chat)
    assert out.messages[0]["content"] == "You help.\nParis is the capital of Italy.\nBe brief."
    assert out.logit_bias == {42: 100.0, 7: 1.5}  # 60*2 + 60*1 clamped to 100; the request's own value wins
    assert [round(w.scale, 6) for w in out.overlay.loras] == [2.0]  # weight 1 * alpha 4 / rank 2
    assert [(v.layer, v.scale) for v in out.overlay.steering] == [(3, 1.0)]  # weight 0.5 * coefficient 2
    assert chat.messages[0]["content"] == "You help."  # the caller's params are not changed
    plain = overlay.adjust(GenerateParams(messages=[{"role": "user", "content": "Q"}]))
    assert plain.messages[0] == {"role": "system", "content": "Paris is the capital of Italy.\nBe brief."}
    completion = overlay.adjust(GenerateParams(prompt="Q"))  # the Lab's rule for a raw prompt: a line before it
    assert completion.prompt == "Paris is the capital of Italy.\nBe brief.\nQ" and completion.messages is None
    req = msgspec.json.decode(b'{"model": "m", "messages": [{"role": "user", "content": "Q"}]}',
                              type=ChatCompletionRequest)
    forwarded = overlay.adjust(GenerateParams(messages=[{"role": "user", "content": "Q"}], request=req)).request
    assert forwarded.messages[0].role == "system" and forwarded.messages[0].text().endswith("Be brief.")
    assert AuraResolver(store)(base, "b").engine is None  # no in-model part: the engine runs the base model
    assert sorted(name for _base, name, _t in AuraResolver(store).listing()) == ["a", "b"]


def test_cli_list_show_delete(env, capsys):
    tmp, job, store, base, _ = env
    store.write("shown", base, [LORA, PROMPT], job, {"job": "job_1", "method": "lora"})
    lab = str(tmp / "lab")
    assert cli(["auras", "list", "--lab-dir", lab]) == 0
    out = capsys.readouterr().out
    assert "shown" in out and "base-model" in out and "lora,prompt_delta" in out
    assert cli(["auras", "show", "shown", "--lab-dir", lab, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"] == "base-model+shown" and shown["files_verified"] is True
    (tmp / "lab" / "auras" / "shown" / "c1.safetensors").write_bytes(b"tampered")
    assert cli(["auras", "show", "shown", "--lab-dir", lab]) == 2
    assert "c1" in capsys.readouterr().err
    assert cli(["auras", "delete", "shown", "--lab-dir", lab]) == 0
    assert cli(["auras", "delete", "shown", "--lab-dir", lab]) == 1
    assert "No aura `shown`" in capsys.readouterr().err
