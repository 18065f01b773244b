"""Persistent registry state in SQLite (`<lab_dir>/registry.sqlite3`, through server.storage.sqlite_file).

Per model id: the aggregate sha256 of its files (with the file list and when it was verified), the
lock flag and the expected hash, a usage count, when it was last used and how long its last load
took. Every write is one transaction, so a crash never leaves a half-written row; the file is in WAL
mode, so the server's event loop, its load threads and a CLI process may all read while one writes."""
from __future__ import annotations

from pathlib import Path

import msgspec

from server.protocol.integrity import FileHash, ModelState
from server.registry.hashing import ModelHash
from server.storage.sqlite_file import SqliteFile

__all__ = ["STATE_FILE", "RegistryState"]

STATE_FILE = "registry.sqlite3"

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


class RegistryState:
    """The SQLite store; any thread may use it (each call has its own connection)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db = SqliteFile(self.path, _SCHEMA, wal=True)

    def _write(self, model_id: str, sql: str, params: tuple) -> None:
        """One transaction: create the model's row if needed, then apply the update."""
        with self._db.transaction() as db:
            db.execute("INSERT INTO model_state (id) VALUES (?) ON CONFLICT(id) DO NOTHING", (model_id,))
            db.execute(sql, (*params, model_id))

    def get(self, model_id: str) -> ModelState | None:
        with self._db.transaction() as db:
            row = db.execute("SELECT * FROM model_state WHERE id = ?", (model_id,)).fetchone()
        return None if row is None else _row_to_state(row)

    def all(self) -> dict[str, ModelState]:
        with self._db.transaction() as db:
            rows = db.execute("SELECT * FROM model_state ORDER BY id").fetchall()
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
        """Nothing stays open between calls; a call after close() opens the file anew (and creates
        the schema again if the file went away)."""
        self._db = SqliteFile(self.path, _SCHEMA, wal=True)


def _row_to_state(row: tuple) -> ModelState:
    model_id, sha256, files, verified_at, locked, expected, use_count, last_used, last_load = row
    return ModelState(id=model_id, sha256=sha256, files=msgspec.json.decode(files, type=list[FileHash]),
                      verified_at=verified_at, locked=bool(locked), expected_sha256=expected,
                      use_count=use_count, last_used=last_used, last_load_seconds=last_load)
