"""Lab jobs in SQLite (lab/jobs.sqlite3): spec, status, progress, timings, result and error survive
a restart. Any thread may use the store (server.storage.sqlite_file)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec

from server.storage.sqlite_file import SqliteFile

__all__ = ["ACTIVE", "TERMINAL", "JobRow", "JobStore"]

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    model       TEXT NOT NULL,
    spec        TEXT NOT NULL,             -- JSON, as validated at submission
    status      TEXT NOT NULL,             -- queued | running | succeeded | failed | cancelled | interrupted
    progress    REAL NOT NULL DEFAULT 0,
    message     TEXT NOT NULL DEFAULT '',
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    result      TEXT,                      -- JSON
    error       TEXT,                      -- JSON {message, type, code}
    artifacts   TEXT NOT NULL DEFAULT '[]' -- JSON list of paths relative to the lab dir
);
CREATE INDEX IF NOT EXISTS jobs_by_model ON jobs (model, kind, created_at);
"""
_COLUMNS = "id, kind, model, spec, status, progress, message, created_at, started_at, finished_at, result, error, " \
           "artifacts"


class JobRow(msgspec.Struct, kw_only=True):
    id: str
    kind: str
    model: str
    spec: dict[str, Any]
    status: str
    progress: float = 0.0
    message: str = ""
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    artifacts: list[str] = []


def _jsonable(obj: Any) -> Any:
    """numpy / torch scalars and arrays, paths: what engines may leave in a result."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError(f"cannot store a {type(obj).__name__} in a job result")


def _encode(value: Any) -> str | None:
    return None if value is None else msgspec.json.encode(value, enc_hook=_jsonable).decode()


def _decode(raw: str | None) -> Any:
    return None if raw is None else msgspec.json.decode(raw)


def _row(values: tuple) -> JobRow:
    (id_, kind, model, spec, status, progress, message, created, started, finished, result, error,
     artifacts) = values
    return JobRow(id=id_, kind=kind, model=model, spec=_decode(spec), status=status, progress=progress,
                  message=message, created_at=created, started_at=started, finished_at=finished,
                  result=_decode(result), error=_decode(error), artifacts=_decode(artifacts))


class JobStore:
    def __init__(self, path: str | Path) -> None:
        self._db = SqliteFile(path, _SCHEMA)

    def _write(self, sql: str, args: tuple) -> int:
        with self._db.transaction() as conn:
            return conn.execute(sql, args).rowcount

    def _read(self, sql: str, args: tuple = ()) -> list[JobRow]:
        with self._db.transaction() as conn:
            return [_row(r) for r in conn.execute(f"SELECT {_COLUMNS} FROM jobs {sql}", args).fetchall()]

    def create(self, job_id: str, kind: str, model: str, spec: dict[str, Any]) -> JobRow:
        now = time.time()
        self._write("INSERT INTO jobs (id, kind, model, spec, status, created_at) VALUES (?, ?, ?, ?, 'queued', ?)",
                    (job_id, kind, model, _encode(spec), now))
        return self.get(job_id)

    def get(self, job_id: str) -> JobRow | None:
        rows = self._read("WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def list(self, *, status: str | None = None, kind: str | None = None, model: str | None = None,
             limit: int = 100) -> list[JobRow]:
        clauses, args = [], []
        for column, value in (("status", status), ("kind", kind), ("model", model)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        where = f"WHERE {' AND '.join(clauses)} " if clauses else ""
        return self._read(f"{where}ORDER BY created_at DESC, rowid DESC LIMIT ?", (*args, limit))

    def mark_running(self, job_id: str) -> bool:
        """queued -> running; False if the job was cancelled meanwhile."""
        return self._write("UPDATE jobs SET status = 'running', started_at = ? WHERE id = ? AND status = 'queued'",
                           (time.time(), job_id)) > 0

    def set_progress(self, job_id: str, progress: float, message: str) -> None:
        self._write("UPDATE jobs SET progress = ?, message = ? WHERE id = ? AND status = 'running'",
                    (progress, message, job_id))

    def finish(self, job_id: str, status: str, *, result: dict | None = None, error: dict | None = None,
               artifacts: list[str] | None = None, progress: float | None = None, message: str | None = None) -> None:
        assert status in TERMINAL, status
        self._write("UPDATE jobs SET status = ?, finished_at = ?, result = ?, error = ?, artifacts = ?, "
                    "progress = COALESCE(?, progress), message = COALESCE(?, message) "
                    "WHERE id = ? AND status IN ('queued', 'running')",
                    (status, time.time(), _encode(result), _encode(error), _encode(artifacts or []), progress,
                     message, job_id))

    def interrupt_running(self) -> int:
        """At start-up: jobs a previous server process was running cannot continue; say so."""
        error = msgspec.json.encode({"message": "The server stopped while this job was running.",
                                     "type": "server_error", "code": "job_interrupted"}).decode()
        return self._write("UPDATE jobs SET status = 'interrupted', finished_at = ?, error = ? "
                           "WHERE status = 'running'", (time.time(), error))
