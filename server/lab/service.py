"""The Lab as the controllers see it: validate a request, queue a job, describe jobs and snapshots."""
from __future__ import annotations

import time
from pathlib import Path

import msgspec

from lab_engines import ENGINES
from server.errors import InvalidRequestError, JobNotFound, LabUnavailable, decode_body
from server.lab.artifacts import ARTIFACTS_URL
from server.lab.job_queue import JobQueue
from server.lab.job_store import JobRow, JobStore
from server.lab.lab_models import LabModels, lab_record
from server.protocol.lab import LabJob, Snapshot
from server.registry import Registry
from server.runtime import ModelPool

__all__ = ["Lab"]


class Lab:
    def __init__(self, registry: Registry, lab_dir: Path, pool: ModelPool, *, jobs_per_model: int = 1,
                 max_running: int = 2) -> None:
        self.registry = registry
        self.lab_dir = Path(lab_dir)
        self.store = JobStore(self.lab_dir / "jobs.sqlite3")
        self.models = LabModels(registry, pool)
        self.queue = JobQueue(self.store, self.models, self.lab_dir, jobs_per_model=jobs_per_model,
                              max_running=max_running)

    # --- submission -----------------------------------------------------------------------
    def submit(self, kind: str, body: bytes) -> LabJob:
        """Validate everything that can be checked without the model, then queue the job (202)."""
        data = decode_body(body, dict)
        model = data.pop("model", None)
        if not isinstance(model, str) or not model:
            raise InvalidRequestError("`model` is required: the id or alias of a served model.", param="model")
        record = self.registry.resolve(model)
        lab_record(record)  # 400 now, not a failed job later, for a backend without torch weights
        spec = self._spec(kind, data)
        if kind == "rollback":
            spec = self._rollback_spec(record.id, spec)
        return self.job(self.queue.submit(kind, record.id, spec))

    def _spec(self, kind: str, data: dict) -> dict:
        try:
            spec_type = ENGINES[kind].spec_type()
        except ImportError as exc:
            raise LabUnavailable(f"The Lab needs torch and transformers: pip install 'omniloader[lab]' ({exc}).") \
                from exc
        spec = decode_body(msgspec.json.encode(data), spec_type)
        return msgspec.to_builtins(spec)

    def _rollback_spec(self, model_id: str, spec: dict) -> dict:
        row = self.store.get(spec["snapshot"])
        if row is None or row.kind != "snapshot" or row.status != "succeeded":
            raise JobNotFound(f"No snapshot `{spec['snapshot']}`: GET /lab/snapshots lists them.", param="snapshot")
        if row.model != model_id:
            raise InvalidRequestError(f"Snapshot `{row.id}` is of model `{row.model}`, not `{model_id}`.",
                                      param="snapshot")
        return {**spec, "snapshot_dir": str(self.lab_dir / "snapshot" / row.id)}

    # --- reading --------------------------------------------------------------------------
    def row(self, job_id: str) -> JobRow:
        row = self.store.get(job_id)
        if row is None:
            raise JobNotFound(f"No Lab job `{job_id}`.", param="id")
        return row

    def job(self, row: JobRow) -> LabJob:
        live = self.queue.live(row.id)
        progress, message = row.progress, row.message
        if live is not None and row.status == "running":
            progress, message = live.progress, live.message
        end = row.finished_at or time.time()
        return LabJob(id=row.id, kind=row.kind, model=row.model, status=row.status, progress=progress,
                      message=message, spec=row.spec, created_at=row.created_at, started_at=row.started_at,
                      finished_at=row.finished_at,
                      duration_s=round(end - row.started_at, 3) if row.started_at else None,
                      result=row.result, error=row.error, artifacts=[ARTIFACTS_URL + a for a in row.artifacts])

    def snapshots(self, model: str | None) -> list[Snapshot]:
        model_id = self.registry.resolve(model).id if model else None
        rows = self.store.list(kind="snapshot", status="succeeded", model=model_id, limit=1000)
        return [Snapshot(id=r.id, model=r.model, created_at=r.created_at, weights_digest=r.result["weights_digest"],
                         n_tensors=r.result["n_tensors"], bytes=r.result["bytes"], note=r.result.get("note", ""))
                for r in rows]

    def latest_report(self, model: str) -> JobRow:
        model_id = self.registry.resolve(model).id
        rows = self.store.list(kind="diagnostics", status="succeeded", model=model_id, limit=1)
        if not rows:
            raise JobNotFound(f"No finished diagnostics for `{model_id}` yet: POST /lab/diagnostics/run first.",
                              param="model")
        return rows[0]
