"""Registry state as `omniloader models ... --json` prints it: a model's hashes, lock and usage, and
the result of a verification."""
from __future__ import annotations

import msgspec

__all__ = ["FileHash", "ModelState", "Verification"]


class FileHash(msgspec.Struct):
    path: str  # relative to the model's folder (POSIX separators); the file name for a single file
    size: int
    sha256: str


class ModelState(msgspec.Struct, kw_only=True):
    id: str
    sha256: str | None = None
    files: list[FileHash] = []
    verified_at: float | None = None
    locked: bool = False
    expected_sha256: str | None = None
    use_count: int = 0
    last_used: float | None = None
    last_load_seconds: float | None = None


class Verification(msgspec.Struct, kw_only=True):
    id: str
    sha256: str
    files: list[FileHash]
    verified_at: float
    locked: bool
    expected_sha256: str | None
    ok: bool  # False only when the model is locked and the hash differs from the expected one
