"""Registering a model: a manifest posted as JSON is validated (its backend included) and written to
models/<id>/manifest.json atomically, where the next scan finds it as a curated model."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import msgspec

from server.errors import InvalidRequestError
from server.registry.manifest import Manifest, ModelRecord, decode_manifest

__all__ = ["registration", "write_manifest"]


def registration(body: bytes, records: Mapping[str, ModelRecord]) -> Manifest:
    """The manifest a JSON body describes; 400 when it is invalid or takes a built-in model's id.
    A local source is made absolute: the manifest is written elsewhere than the caller's folder."""
    try:
        manifest = decode_manifest(body, json=True)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidRequestError(f"Invalid manifest: {exc}") from None
    existing = records.get(manifest.id)
    if existing is not None and existing.origin == "builtin":
        raise InvalidRequestError(f"`{manifest.id}` is a built-in model id.", param="id")
    if "://" not in manifest.source:
        manifest.source = str(Path(manifest.source).expanduser().resolve())
    return manifest


def write_manifest(models_dir: Path, manifest: Manifest) -> Path:
    path = models_dir / manifest.id / "manifest.json"
    root, folder = models_dir.resolve(), path.parent.resolve()
    if folder.parent != root or folder.name != manifest.id:  # a symlinked folder, a Windows drive in the id
        raise InvalidRequestError(f"`{manifest.id}` would be written outside the models folder: choose another id.",
                                  param="id")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))
    tmp.replace(path)  # atomic: a crash never leaves half a manifest
    return path
