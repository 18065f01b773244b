"""Layered discovery: built-in manifests, curated ones (models/*/manifest.*), loose GGUF files and HF
and ONNX folders under models/, and the example custom backend; merged by id (curated wins over
built-in over discovered), plus the alias table."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec

from adapters.hf_files import has_chat_template, is_causal, read_json
from server.registry.manifest import MANIFEST_NAMES, ORIGIN_RANK, Manifest, ModelRecord, decode_manifest

__all__ = ["BUILTIN_DIR", "VICTOR_DIR", "GGUF_CAPABILITIES", "scan_models", "build_aliases", "load_manifest"]

log = logging.getLogger("omniloader.registry")

BUILTIN_DIR = Path(__file__).parent.parent / "builtin_models"
VICTOR_DIR = Path(__file__).resolve().parents[2] / "victor"  # the example custom backend (victor/manifest.yaml)
# What llama.cpp gives any GGUF it can load (adapters/llama_cpp.py): a discovered GGUF advertises it.
GGUF_CAPABILITIES = ["chat", "completion", "tools", "json_schema", "logprobs", "embeddings"]

Records = dict[str, ModelRecord]


def scan_models(models_dir: Path, victor_dir: Path | None) -> Records:
    """Every model by id: built-in, then models/ (curated manifests, then discovery), then Victor."""
    records: Records = {}
    for path in sorted(BUILTIN_DIR.glob("*.yaml")):
        _add(records, load_manifest(path, "builtin"))
    manifest_dirs: set[Path] = set()
    if models_dir.is_dir():
        for path in sorted(models_dir.glob("*/manifest.*")):
            if path.name in MANIFEST_NAMES:
                manifest_dirs.add(path.parent)
                _add(records, load_manifest(path, "curated"))
        _discover(models_dir, records, manifest_dirs)
    if victor_dir is not None:  # a curated manifest in models/ with the same id wins
        for path in (victor_dir / name for name in MANIFEST_NAMES):
            if path.is_file():
                _add(records, load_manifest(path, "curated"))
                break
    return records


def load_manifest(path: Path, origin: str) -> ModelRecord:
    """A manifest file's record; a bad one is an invalid record saying why (the scan goes on)."""
    try:
        manifest = decode_manifest(path.read_bytes(), json=path.suffix == ".json")
    except (msgspec.ValidationError, msgspec.DecodeError, OSError) as exc:
        log.warning("skipping bad manifest %s: %s", path, exc)
        return ModelRecord(id=f"invalid:{path.parent.name}/{path.name}", origin=origin,
                           manifest_path=str(path), error=str(exc))
    return ModelRecord(id=manifest.id, origin=origin, manifest=manifest, manifest_path=str(path))


def build_aliases(records: Records) -> dict[str, str]:
    aliases: dict[str, str] = {}
    for record in records.values():
        for alias in record.manifest.aliases if record.manifest else ():
            if alias in records or alias in aliases:
                log.warning("alias %s of %s is taken; ignored", alias, record.id)
            else:
                aliases[alias] = record.id
    return aliases


def _discover(models_dir: Path, records: Records, manifest_dirs: set[Path]) -> None:
    """Walk models/ (following symlinks, once per real folder): loose GGUF files anywhere, HF and
    ONNX folders outside curated ones; a claimed folder's subfolders are not models of their own."""
    claimed: list[Path] = []
    seen: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(models_dir, followlinks=True):
        here = Path(dirpath)
        if here.resolve() in seen:  # a symlink loop or a second link to the same folder
            dirnames[:] = []
            continue
        seen.add(here.resolve())
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and here / d not in manifest_dirs)
        inside = any(c == here or c in here.parents for c in claimed)
        if here != models_dir and not inside and (backend := _dir_backend(here, filenames)):
            claimed.append(here)
            _add(records, _discovered_dir(here, backend))
        for name in sorted(filenames):
            if name.endswith(".gguf"):
                _add(records, _discovered_gguf(here / name))


def _add(records: Records, record: ModelRecord) -> None:
    existing = records.get(record.id)
    if existing is not None and existing.manifest is not None:
        if ORIGIN_RANK[record.origin] < ORIGIN_RANK[existing.origin]:
            return
        if ORIGIN_RANK[record.origin] == ORIGIN_RANK[existing.origin]:
            log.warning("duplicate model id %s in %s (kept %s)", record.id,
                        record.manifest_path or record.manifest.source,
                        existing.manifest_path or existing.manifest.source)
            return
    records[record.id] = record


def _dir_backend(folder: Path, filenames: list[str]) -> str | None:
    """An HF folder (config.json + weights) or an ONNX folder (*.onnx here or in onnx/)."""
    if "config.json" in filenames and any(
            n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin")) for n in filenames):
        return "hf_transformers"
    if any(n.endswith(".onnx") for n in filenames) or any((folder / "onnx").glob("*.onnx")):
        return "onnx_runtime"
    return None


def _dir_model_id(folder: Path) -> str:
    # A Hugging Face cache snapshot (models--org--name/snapshots/<rev>) is named after its repo.
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--")
    return folder.name


def _discovered_dir(folder: Path, backend: str) -> ModelRecord:
    """Roles and capabilities of a folder model from its config.json and tokenizer_config.json."""
    config = read_json(folder / "config.json")
    template = has_chat_template(folder)
    if is_causal(config):
        capabilities = ["chat", "completion"] if template else ["completion"]
        roles = ["chat"] if template else ["completion"]
    else:  # an encoder (BertModel, ...): embeddings only
        capabilities, roles = ["embeddings"], ["embed"]
    context = config.get("max_position_embeddings") or config.get("n_positions")
    manifest = Manifest(id=_dir_model_id(folder), backend=backend, source=str(folder.absolute()), roles=roles,
                        capabilities=capabilities,
                        context_length=context if isinstance(context, int) and context > 0 else None)
    return ModelRecord(id=manifest.id, origin="discovered", manifest=manifest)


def _discovered_gguf(path: Path) -> ModelRecord:
    # absolute(), not resolve(): a symlinked GGUF keeps the name the user gave it (and hashes under it)
    manifest = Manifest(id=path.stem, backend="llama_cpp", source=str(path.absolute()),
                        capabilities=list(GGUF_CAPABILITIES))
    return ModelRecord(id=manifest.id, origin="discovered", manifest=manifest)
