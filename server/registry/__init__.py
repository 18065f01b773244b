"""Model registry: manifests -> ModelRecords; layered discovery (curated manifests, loose GGUF files,
HF and ONNX folders); resolution by id, alias or role; capability-aware selection; integrity hooks.

One concern per module: manifest (schema, decoding, sources), discovery (scanning models/),
selection (names, roles, capabilities), writing (registering a manifest), hashing, state (the
SQLite store), integrity (verify, lock, check) and registry (the Registry tying them together)."""
from __future__ import annotations

from server.errors import NoModelQualifies
from server.protocol.integrity import FileHash, ModelState, Verification
from server.protocol.models import Rejection, SelectionResult
from server.registry.hashing import (
    CHUNK_SIZE,
    ModelHash,
    aggregate_sha256,
    file_sha256,
    hash_model_files,
    model_files,
)
from server.registry.integrity import ModelIntegrity
from server.registry.manifest import Manifest, ModelRecord, resolve_source
from server.registry.registry import Registry
from server.registry.selection import ROLE_PREFIX, Selection
from server.registry.state import STATE_FILE, RegistryState

__all__ = [
    "Manifest", "ModelRecord", "Registry", "resolve_source", "Rejection", "Selection", "SelectionResult",
    "NoModelQualifies", "ROLE_PREFIX",
    # registry state (once server/registry_state.py)
    "CHUNK_SIZE", "STATE_FILE", "FileHash", "ModelHash", "ModelState", "Verification", "RegistryState",
    "ModelIntegrity", "model_files", "file_sha256", "aggregate_sha256", "hash_model_files",
]
