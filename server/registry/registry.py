"""The Registry: one merged view of the built-in, curated (models/*/manifest.*) and discovered
models, resolution by id, alias, `default` or role, and (with a lab_dir) their persistent state:
hashes, locks, usage."""
from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from adapters import adapter_class
from adapters.errors import EngineError
from server.errors import ModelNotFound
from server.registry.discovery import VICTOR_DIR, build_aliases, scan_models
from server.registry.integrity import ModelIntegrity
from server.registry.manifest import ModelRecord
from server.registry.selection import DEFAULT_ALIAS, ROLE_PREFIX, Selection, preference, select
from server.registry.state import STATE_FILE, RegistryState
from server.registry.writing import registration, write_manifest

__all__ = ["Registry"]

log = logging.getLogger("omniloader.registry")


class Registry:
    """One merged view of the built-in, curated (models/*/manifest.*) and discovered models,
    plus (with a lab_dir) their persistent state: hashes, locks, usage."""

    def __init__(self, models_dir: Path, default_model: str = "smollm2-135m-instruct",
                 lab_dir: Path | None = None, victor_dir: Path | None = VICTOR_DIR) -> None:
        self.models_dir = Path(models_dir)
        self.victor_dir = Path(victor_dir) if victor_dir is not None else None  # None: not scanned
        self.default_model = default_model
        self._records: dict[str, ModelRecord] = {}
        self._aliases: dict[str, str] = {}
        self._capabilities: dict[str, tuple[ModelRecord, list[str]]] = {}
        self._live_capabilities: dict[str, list[str]] = {}
        self.scanned_at = int(time.time())
        self.state = RegistryState(Path(lab_dir) / STATE_FILE) if lab_dir is not None else None
        self.integrity = ModelIntegrity(self.state) if self.state is not None else None

    def scan(self) -> None:
        records = scan_models(self.models_dir, self.victor_dir)
        self._records = records
        self._aliases = build_aliases(records)
        self.scanned_at = int(time.time())
        log.info("scanned %s: %d models", self.models_dir, len(records))

    def records(self) -> list[ModelRecord]:
        return list(self._records.values())

    def usable(self) -> list[ModelRecord]:
        return [r for r in self._records.values() if r.manifest is not None]

    def get(self, model_id: str) -> ModelRecord:
        record = self._records.get(model_id)
        if record is None or record.manifest is None:
            raise ModelNotFound(model_id)
        return record

    def names_model(self, name: str) -> bool:
        """True when `name` is a model's id or alias (a usable model or an invalid one)."""
        return self._aliases.get(name, name) in self._records

    def resolve(self, name: str) -> ModelRecord:
        """A request's `model` (id, alias, `default` or `role:<role>`) -> its record; 404 otherwise."""
        if name == DEFAULT_ALIAS:
            name = self.default_model
        target = self._aliases.get(name, name)
        if target not in self._records and name.startswith(ROLE_PREFIX):
            return self.select(name).record
        return self.get(target)

    def select(self, name_or_role: str, require: Iterable[str] | str | None = None) -> Selection:
        """The model for an id/alias or `role:<role>` that has every required capability. For a role:
        the default model if it qualifies, then curated before built-in before discovered, then by id."""
        return select(self, name_or_role, require)

    def candidates(self, role: str) -> list[ModelRecord]:
        """The usable models having `role`, in the order `role:<role>` tries them."""
        default_id = self.default_id()
        return sorted((r for r in self.usable() if role in r.manifest.roles), key=lambda r: preference(r, default_id))

    def default_id(self) -> str:
        return self._aliases.get(self.default_model, self.default_model)

    def capabilities(self, record: ModelRecord) -> list[str]:
        """What the model can do: what its loaded adapter reports while it is loaded for serving, else
        what its backend declares before loading (cached per record)."""
        if (live := self._live_capabilities.get(record.id)) is not None:
            return live
        cached = self._capabilities.get(record.id)
        if cached is None or cached[0] is not record:
            try:
                declared = adapter_class(record.manifest.backend).declared_capabilities(record)
            except EngineError:  # a backend that cannot be imported: only the manifest's word is left
                declared = list(record.manifest.capabilities)
            cached = self._capabilities[record.id] = (record, declared)
        return cached[1]

    def set_live_capabilities(self, model_id: str, capabilities: list[str] | None) -> None:
        """The pool reports a serving instance's capabilities when it loads (None when it unloads)."""
        if capabilities is None:
            self._live_capabilities.pop(model_id, None)
        else:
            self._live_capabilities[model_id] = capabilities

    def check_integrity(self, record: ModelRecord) -> None:
        """Before a load: re-hash a locked model's files; raises ModelHashMismatch (409) if they
        changed. Hashing reads every byte: call it off the event loop. No-op without a lab_dir."""
        if self.integrity is not None and (path := record.local_path()) is not None:
            self.integrity.check(record.id, path)

    def record_use(self, model_id: str) -> None:
        self._record(lambda state: state.record_use(model_id, time.time()))

    def record_load(self, model_id: str, seconds: float) -> None:
        self._record(lambda state: state.record_load(model_id, seconds))

    def _record(self, write: Callable[[RegistryState], None]) -> None:
        # Bookkeeping must never fail a request: a locked or full disk only costs a warning.
        try:
            if self.state is not None:
                write(self.state)
        except (sqlite3.Error, OSError) as exc:
            log.warning("registry state not updated: %s", exc)

    def register(self, body: bytes) -> ModelRecord:
        """Validate a manifest (JSON body), write it to models/<id>/manifest.json and add it."""
        manifest = registration(body, self._records)
        write_manifest(self.models_dir, manifest)
        self.scan()
        return self.get(manifest.id)
