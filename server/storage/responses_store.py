"""Stored Responses (`store: true`) in SQLite: what `previous_response_id` and GET/DELETE read.

The store knows rows, not API types: the caller hands it JSON already encoded. Each call runs in
a worker thread on its own connection (server.storage.sqlite_file), so the event loop never
waits on the disk."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from server.storage.sqlite_file import SqliteFile

__all__ = ["StoredResponse", "ResponseStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id         TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    model      TEXT NOT NULL,
    messages   TEXT NOT NULL,  -- the conversation that produced it (chat messages, no instructions)
    output     TEXT NOT NULL,  -- its output items
    response   TEXT NOT NULL   -- the whole Response object, as GET returns it
)"""


@dataclass(frozen=True)
class StoredResponse:
    id: str
    created_at: int
    model: str
    messages: str
    output: str
    response: str


class ResponseStore:
    def __init__(self, path: str | Path) -> None:
        self._db = SqliteFile(path, _SCHEMA)

    def _save(self, row: StoredResponse) -> None:
        with self._db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                         (row.id, row.created_at, row.model, row.messages, row.output, row.response))

    def _get(self, response_id: str) -> StoredResponse | None:
        with self._db.transaction() as conn:
            found = conn.execute("SELECT id, created_at, model, messages, output, response FROM responses "
                                 "WHERE id = ?", (response_id,)).fetchone()
        return StoredResponse(*found) if found else None

    def _delete(self, response_id: str) -> bool:
        with self._db.transaction() as conn:
            return conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    async def save(self, row: StoredResponse) -> None:
        await asyncio.to_thread(self._save, row)

    async def get(self, response_id: str) -> StoredResponse | None:
        return await asyncio.to_thread(self._get, response_id)

    async def delete(self, response_id: str) -> bool:
        """True if it existed."""
        return await asyncio.to_thread(self._delete, response_id)
