"""The correction queue: better answers users gave, kept in SQLite (`<lab dir>/corrections.sqlite3`)
until a live training run uses them. Each write is one transaction: a crash never leaves half a row."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import msgspec

from server.protocol.corrections import Correction
from server.storage.sqlite_file import SqliteFile

__all__ = ["CorrectionStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS corrections (
    id            TEXT PRIMARY KEY,
    model         TEXT NOT NULL,
    prompt        TEXT,
    messages      TEXT,            -- JSON list of chat messages, or NULL
    good          TEXT NOT NULL,
    bad           TEXT,
    completion_id TEXT,
    created_at    REAL NOT NULL,
    status        TEXT NOT NULL,   -- queued | applied
    applied_by    TEXT
);
CREATE INDEX IF NOT EXISTS corrections_model ON corrections (model, created_at);
"""
_COLUMNS = "id, model, prompt, messages, good, bad, completion_id, created_at, status, applied_by"


def _row(values: tuple) -> Correction:
    row = dict(zip(_COLUMNS.split(", "), values))
    row["messages"] = msgspec.json.decode(row["messages"]) if row["messages"] else None
    return Correction(**row)


class CorrectionStore:
    def __init__(self, path: str | Path) -> None:
        self._db = SqliteFile(path, _SCHEMA, wal=True)

    def add(self, *, model: str, good: str, prompt: str | None = None, messages: list[dict] | None = None,
            bad: str | None = None, completion_id: str | None = None) -> Correction:
        correction = Correction(id=f"corr_{uuid.uuid4().hex[:24]}", model=model, prompt=prompt, messages=messages,
                                good=good, bad=bad, completion_id=completion_id, created_at=time.time(),
                                status="queued")
        with self._db.transaction() as conn:
            conn.execute(f"INSERT INTO corrections ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (correction.id, model, prompt, msgspec.json.encode(messages).decode() if messages else None,
                          good, bad, completion_id, correction.created_at, "queued", None))
        return correction

    def get(self, correction_id: str) -> Correction | None:
        with self._db.transaction() as conn:
            found = conn.execute(f"SELECT {_COLUMNS} FROM corrections WHERE id = ?", (correction_id,)).fetchone()
        return _row(found) if found else None

    def list(self, model: str | None = None, status: str | None = None, limit: int = 1000) -> list[Correction]:
        where, args = [], []
        for column, value in (("model", model), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        sql = f"SELECT {_COLUMNS} FROM corrections" + (f" WHERE {' AND '.join(where)}" if where else "")
        with self._db.transaction() as conn:
            rows = conn.execute(sql + " ORDER BY created_at, id LIMIT ?", (*args, limit)).fetchall()
        return [_row(r) for r in rows]

    def delete(self, correction_id: str) -> bool:
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM corrections WHERE id = ?", (correction_id,)).rowcount > 0

    def mark_applied(self, ids: list[str], job_id: str) -> None:
        with self._db.transaction() as conn:
            conn.executemany("UPDATE corrections SET status = 'applied', applied_by = ? WHERE id = ?",
                             [(job_id, i) for i in ids])
