"""Persistent registry state in SQLite (`<lab_dir>/registry.sqlite3`) and model integrity checks.

Per model id: the aggregate sha256 of its files (with the file list and when it was verified), the
lock flag and the expected hash, a usage count, when it was last used and how long its last load
took. Every write is one transaction, so a crash never leaves a half-written row."""
from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import msgspec

from server.errors import ModelHashMismatch, ModelLoadError

__all__ = [
    "CHUNK_SIZE",
    "STATE_FILE",
    "FileHash",
    "ModelHash",
    "ModelState",
    "Verification",
    "RegistryState",
    "ModelIntegrity",
    "model_files",
    "file_sha256",
    "aggregate_sha256",
    "hash_model_files",
]

log = logging.getLogger("omniloader.registry")

CHUNK_SIZE = 1 << 20  # hash in 1 MiB reads: multi-GB weights never sit in memory
STATE_FILE = "registry.sqlite3"
# Manifests at the top of a model folder describe the model; editing one must not break its lock.
_SKIPPED_TOP_LEVEL = frozenset({"manifest.yaml", "manifest.yml", "manifest.json"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS model_state (
    id TEXT PRIMARY KEY,
    sha256 TEXT,
    files TEXT NOT NULL DEFAULT '[]',
    verified_at REAL,
    locked INTEGER NOT NULL DEFAULT 0,
    expected_sha256 TEXT,
    use_count INTEGER NOT NULL DEFAULT 0,
    last_used REAL,
    last_load_seconds REAL
)
"""


class FileHash(msgspec.Struct):
    path: str  # relative to the model's folder (POSIX separators); the file name for a single file
    size: int
    sha256: str


class ModelHash(msgspec.Struct):
    sha256: str  # aggregate over the sorted (path, file sha256) pairs
    files: list[FileHash]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


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


def model_files(source: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of every file that makes up a model: the file itself, or every file
    under its folder but hidden ones (download caches, lock files) and top-level manifests."""
    if source.is_file():
        return [(source.name, source)]
    if not source.is_dir():
        raise FileNotFoundError(f"{source} does not exist")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        here = Path(dirpath)
        for name in filenames:
            if name.startswith(".") or (here == source and name in _SKIPPED_TOP_LEVEL):
                continue
            found.append(((here / name).relative_to(source).as_posix(), here / name))
    return sorted(found)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def aggregate_sha256(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 of `<file sha256>  <relative path>\\n` lines sorted by path: the text `sha256sum`
    prints for the files listed in C-locale order, so the shell can reproduce it (models/README.md)."""
    lines = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(pairs))
    return hashlib.sha256(lines.encode()).hexdigest()


def hash_model_files(source: Path) -> ModelHash:
    files = [FileHash(rel, path.stat().st_size, file_sha256(path)) for rel, path in model_files(source)]
    if not files:
        raise FileNotFoundError(f"{source} holds no files to hash")
    return ModelHash(aggregate_sha256((f.path, f.sha256) for f in files), files)


class RegistryState:
    """The SQLite store. One connection, serialized by a lock: the server's event loop, its load
    threads and a CLI process may all write (WAL lets readers and one writer overlap)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            self._conn = conn
        return self._conn

    def _write(self, model_id: str, sql: str, params: tuple) -> None:
        """One transaction: create the model's row if needed, then apply the update."""
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT INTO model_state (id) VALUES (?) ON CONFLICT(id) DO NOTHING", (model_id,))
                db.execute(sql, (*params, model_id))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def get(self, model_id: str) -> ModelState | None:
        with self._lock:
            row = self._db().execute("SELECT * FROM model_state WHERE id = ?", (model_id,)).fetchone()
        return None if row is None else _row_to_state(row)

    def all(self) -> dict[str, ModelState]:
        with self._lock:
            rows = self._db().execute("SELECT * FROM model_state ORDER BY id").fetchall()
        return {row[0]: _row_to_state(row) for row in rows}

    def record_verification(self, model_id: str, result: ModelHash, at: float) -> None:
        self._write(model_id, "UPDATE model_state SET sha256 = ?, files = ?, verified_at = ? WHERE id = ?",
                    (result.sha256, msgspec.json.encode(result.files).decode(), at))

    def set_lock(self, model_id: str, locked: bool, expected_sha256: str | None = None) -> None:
        """Lock or unlock; a given expected hash replaces the stored one, None keeps it."""
        self._write(model_id, "UPDATE model_state SET locked = ?, expected_sha256 = COALESCE(?, expected_sha256) "
                    "WHERE id = ?", (int(locked), expected_sha256))

    def record_use(self, model_id: str, at: float) -> None:
        self._write(model_id, "UPDATE model_state SET use_count = use_count + 1, last_used = ? WHERE id = ?",
                    (at,))

    def record_load(self, model_id: str, seconds: float) -> None:
        self._write(model_id, "UPDATE model_state SET last_load_seconds = ? WHERE id = ?", (seconds,))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _row_to_state(row: tuple) -> ModelState:
    model_id, sha256, files, verified_at, locked, expected, use_count, last_used, last_load = row
    return ModelState(id=model_id, sha256=sha256, files=msgspec.json.decode(files, type=list[FileHash]),
                      verified_at=verified_at, locked=bool(locked), expected_sha256=expected,
                      use_count=use_count, last_used=last_used, last_load_seconds=last_load)


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
