"""A SQLite file shared by threads: the schema is created on first use, and each call gets its own
short-lived connection (sqlite3 connections must not cross threads; opening one costs microseconds)."""
from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["SqliteFile"]


class SqliteFile:
    """`wal=True` puts the file in write-ahead-log mode (readers and one writer overlap, other
    processes included) with synchronous=NORMAL on every connection."""

    def __init__(self, path: str | Path, schema: str, *, wal: bool = False) -> None:
        self.path = Path(path)
        self._schema = schema
        self._wal = wal
        self._ready = False
        self._init_lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection inside one transaction: committed if the block succeeds, rolled back if it raises,
        closed either way (a row changes whole or not at all)."""
        conn = self._connect()
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        if not self._ready:
            with self._init_lock:
                if not self._ready:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    conn = sqlite3.connect(self.path, timeout=10.0)
                    try:
                        if self._wal:
                            conn.execute("PRAGMA journal_mode=WAL")  # stays with the file
                        with conn:
                            conn.executescript(self._schema)
                    finally:
                        conn.close()
                    self._ready = True
        conn = sqlite3.connect(self.path, timeout=10.0)
        if self._wal:
            conn.execute("PRAGMA synchronous=NORMAL")
        return conn
