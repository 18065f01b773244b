"""Stored Responses (`store: true`) in SQLite: what `previous_response_id` and GET/DELETE read.

The store knows rows, not API types: the caller hands it JSON already encoded. Each call opens
its own connection in a worker thread, so the event loop never waits on the disk and no
connection is shared between threads."""
from __future__ import annotations

import asyncio
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

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
        self.path = Path(path)
        self._ready = False
        self._init_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if not self._ready:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10.0)
        if not self._ready:
            with self._init_lock:
                if not self._ready:
                    with conn:
                        conn.execute(_SCHEMA)
                    self._ready = True
        return conn

    def _save(self, row: StoredResponse) -> None:
        conn = self._connect()
        try:
            with conn:  # one transaction: the row is there whole or not at all
                conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                             (row.id, row.created_at, row.model, row.messages, row.output, row.response))
        finally:
            conn.close()

    def _get(self, response_id: str) -> StoredResponse | None:
        conn = self._connect()
        try:
            found = conn.execute("SELECT id, created_at, model, messages, output, response FROM responses "
                                 "WHERE id = ?", (response_id,)).fetchone()
        finally:
            conn.close()
        return StoredResponse(*found) if found else None

    def _delete(self, response_id: str) -> bool:
        conn = self._connect()
        try:
            with conn:
                return conn.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0
        finally:
            conn.close()

    async def save(self, row: StoredResponse) -> None:
        await asyncio.to_thread(self._save, row)

    async def get(self, response_id: str) -> StoredResponse | None:
        return await asyncio.to_thread(self._get, response_id)

    async def delete(self, response_id: str) -> bool:
        """True if it existed."""
        return await asyncio.to_thread(self._delete, response_id)
