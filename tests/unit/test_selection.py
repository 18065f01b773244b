"""Role and capability selection: Registry.select / resolve("role:...") over tmp model folders."""
import json
from pathlib import Path

import pytest

from server.errors import ModelNotFound
from server.registry import ModelHash, NoModelQualifies, Registry, RegistryState


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def curated(models: Path, model_id: str, *, roles=("chat",), caps=("chat",), source: str | None = None) -> None:
    source = source or f"{model_id}.gguf"
    folder = models / f"dir-{model_id}"
    write(folder / "manifest.json", json.dumps({"id": model_id, "backend": "llama_cpp", "source": source,
                                                "roles": list(roles), "capabilities": list(caps)}))
    if "://" not in source and not Path(source).is_absolute():
        write(folder / source, "weights")


@pytest.fixture
def models(tmp_path):
    models = tmp_path / "models"
    curated(models, "zeta-chat", caps=("chat", "tools", "vision"))
    curated(models, "alpha-chat", caps=("chat",))
    curated(models, "embedder", roles=("embed",), caps=("embeddings",))
    write(models / "aaa-loose.gguf", "x")  # discovered: role chat, the llama.cpp capability set
    return models


def registry(models: Path, **kwargs) -> Registry:
    reg = Registry(models, **kwargs)
    reg.scan()
    return reg


def test_role_prefers_the_default_model_when_it_has_the_role(models):
    reg = registry(models)  # the built-in default has role chat
    chosen = reg.select("role:chat")
    assert chosen.record.id == "smollm2-135m-instruct"
    assert "default model" in chosen.reason and chosen.rejected == []
    assert reg.resolve("role:chat").id == "smollm2-135m-instruct"


def test_role_then_prefers_curated_over_builtin_over_discovered_then_id_order(models):
    reg = registry(models, default_model="embedder")  # the default lacks role chat: order decides
    assert [r.id for r in reg.candidates("chat")] == ["alpha-chat", "zeta-chat", "smollm2-135m-instruct",
                                                      "aaa-loose"]
    chosen = reg.select("role:chat")
    assert chosen.record.id == "alpha-chat" and "first curated model" in chosen.reason
    assert reg.select("role:embed").record.id == "embedder"
    assert reg.resolve("role:embed").id == "embedder"


def test_required_capabilities_skip_candidates_and_say_why(models):
    reg = registry(models)
    chosen = reg.select("role:chat", ["vision"])
    assert chosen.record.id == "zeta-chat"
    assert [(r.id, r.reason) for r in chosen.rejected] == [
        ("smollm2-135m-instruct",
         "lacks vision (capabilities: chat, completion, tools, json_schema, logprobs, embeddings)"),
        ("alpha-chat", "lacks vision (capabilities: chat)")]
    assert "has vision" in chosen.reason and "2 candidate(s) passed over" in chosen.reason
    # comma-separated and repeated requirements combine; the default has tools but not vision
    both = reg.select("role:chat", ["tools,vision", " tools"])
    assert both.record.id == "zeta-chat" and len(both.rejected) == 2
    assert both.reason.endswith("has tools, vision; 2 candidate(s) passed over")
    assert reg.select("role:chat", ["tools", "json_schema"]).record.id == "smollm2-135m-instruct"


def test_nothing_qualifies_is_a_404_listing_every_rejection(models):
    reg = registry(models)
    with pytest.raises(NoModelQualifies) as info:
        reg.select("role:chat", ["audio"])
    exc = info.value
    assert isinstance(exc, ModelNotFound) and exc.status_code == 404 and exc.code == "model_not_found"
    assert {r.id for r in exc.rejected} == {"smollm2-135m-instruct", "alpha-chat", "zeta-chat", "aaa-loose"}
    assert "role:chat with audio" in exc.message and "`alpha-chat` lacks audio" in exc.message
    with pytest.raises(NoModelQualifies, match="no model has role `rerank`"):
        reg.resolve("role:rerank")


def test_select_by_name_checks_the_named_model_only(models):
    reg = registry(models)
    chosen = reg.select("smollm2", ["chat"])
    assert chosen.record.id == "smollm2-135m-instruct" and "`smollm2` names it" in chosen.reason
    with pytest.raises(NoModelQualifies, match="`alpha-chat` lacks tools") as info:
        reg.select("alpha-chat", "tools")
    assert [r.id for r in info.value.rejected] == ["alpha-chat"]
    with pytest.raises(ModelNotFound):
        reg.select("nope")


def test_a_model_whose_files_are_missing_is_passed_over(models):
    curated(models, "aaa-first", source=str(models / "gone.gguf"))  # would sort first among curated
    reg = registry(models, default_model="embedder")
    chosen = reg.select("role:chat")
    assert chosen.record.id == "alpha-chat"
    assert chosen.rejected[0].id == "aaa-first" and "has no files at" in chosen.rejected[0].reason


def test_a_locked_model_that_failed_verification_is_passed_over(models, tmp_path):
    lab = tmp_path / "lab"
    state = RegistryState(lab / "registry.sqlite3")
    state.record_verification("alpha-chat", ModelHash("b" * 64, []), 1.0)
    state.set_lock("alpha-chat", True, "a" * 64)
    state.close()
    reg = registry(models, default_model="embedder", lab_dir=lab)
    chosen = reg.select("role:chat")
    assert chosen.record.id == "zeta-chat"
    assert chosen.rejected[0].id == "alpha-chat" and "locked to sha256 aaaaaaaaaaaa" in chosen.rejected[0].reason


def test_an_id_that_looks_like_a_role_is_still_an_id(models):
    curated(models, "role:chat", roles=("embed",), caps=("embeddings",), source="weights.gguf")
    reg = registry(models)
    assert reg.resolve("role:chat").id == "role:chat"
