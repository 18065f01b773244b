"""Verify, lock and check models against the registry state: a locked model whose files no longer
hash to the pinned sha256 is refused before it loads (409 model_hash_mismatch)."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from server.errors import ModelHashMismatch, ModelLoadError
from server.protocol.integrity import ModelState, Verification
from server.registry.hashing import hash_model_files
from server.registry.state import RegistryState

__all__ = ["ModelIntegrity"]

log = logging.getLogger("omniloader.registry")


class ModelIntegrity:
    """Verify, lock and check models against the state; `source` is the model's file or folder."""

    def __init__(self, state: RegistryState, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self._clock = clock

    def verify(self, model_id: str, source: Path) -> Verification:
        """Hash the model's files now and record the result with a timestamp."""
        try:
            result = hash_model_files(source)
        except OSError as exc:
            raise ModelLoadError(f"Model `{model_id}` cannot be hashed: {exc}") from None
        at = self._clock()
        self.state.record_verification(model_id, result, at)
        row = self.state.get(model_id)
        locked, expected = (row.locked, row.expected_sha256) if row else (False, None)
        ok = not (locked and expected is not None and expected != result.sha256)
        log.info("verified %s: sha256 %s over %d file(s)%s", model_id, result.sha256, len(result.files),
                 "" if ok else f" (locked to {expected}: MISMATCH)")
        return Verification(id=model_id, sha256=result.sha256, files=result.files, verified_at=at,
                            locked=locked, expected_sha256=expected, ok=ok)

    def lock(self, model_id: str, source: Path, *, set_expected: bool = False) -> ModelState:
        """Lock the model. The expected hash is kept if one is pinned; else (or with set_expected)
        it is the last verified hash, or the hash computed now when there is none."""
        row = self.state.get(model_id)
        expected = row.expected_sha256 if row and not set_expected else None
        if expected is None:
            recorded = row.sha256 if row and not set_expected else None
            expected = recorded or self.verify(model_id, source).sha256
        self.state.set_lock(model_id, True, expected)
        log.info("locked %s to sha256 %s", model_id, expected)
        return self.state.get(model_id)

    def unlock(self, model_id: str) -> ModelState:
        self.state.set_lock(model_id, False)
        log.info("unlocked %s", model_id)
        return self.state.get(model_id)

    def check(self, model_id: str, source: Path) -> Verification | None:
        """Before a load: a locked model is re-hashed and refused if it changed. None when unlocked."""
        row = self.state.get(model_id)
        if row is None or not row.locked or row.expected_sha256 is None:
            return None
        result = self.verify(model_id, source)
        if not result.ok:
            raise ModelHashMismatch(model_id, row.expected_sha256, result.sha256)
        return result
