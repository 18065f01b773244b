"""The Lab as the controllers see it: validate a request, queue a job, describe jobs and snapshots."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from lab_engines import ENGINES
from lab_engines.working_memory import ModelDims, responsible_field, working_memory
from server.errors import InvalidRequestError, JobNotFound, LabUnavailable, decode_body
from server.lab.artifacts import ARTIFACTS_URL, is_job_id, job_dir, job_file
from server.lab.auras import AuraStore
from server.lab.job_queue import JobQueue
from server.lab.job_store import JobRow, JobStore
from server.lab.corrections import CorrectionStore
from server.lab.lab_models import LabModels, lab_record
from server.lab.runner_jobs import is_runner_model, runner_spec
from server.lab.teaching import TRAIN_KINDS, Teaching
from server.protocol.lab import LabJob, Snapshot
from server.registry import ModelRecord, Registry
from server.runtime import ModelPool

__all__ = ["Lab"]

log = logging.getLogger("omniloader.lab")
AURAS_DIR = "auras"
SNAPSHOT_MANIFEST = "snapshot.json"  # = lab_engines.snapshots.MANIFEST (that module imports torch)


class Lab:
    def __init__(self, registry: Registry, lab_dir: Path, pool: ModelPool, *, jobs_per_model: int = 1,
                 max_running: int = 2, budget_available: Callable[[ModelRecord], int] | None = None) -> None:
        """budget_available(record) is the memory a job's working set may take on a copy of `record`
        (ModelPool.room_for); None: jobs are not checked against it."""
        self.registry = registry
        self.lab_dir = Path(lab_dir)
        self._adapter_factory = pool.adapter_factory  # reads a model's shape without loading it
        self._budget_available = budget_available
        self.store = JobStore(self.lab_dir / "jobs.sqlite3")
        self.auras = AuraStore(self.lab_dir / AURAS_DIR)  # what jobs teach, served as `model: "base+aura"`
        self.models = LabModels(registry, pool)
        self.queue = JobQueue(self.store, self.models, self.lab_dir, jobs_per_model=jobs_per_model,
                              max_running=max_running)
        self.teaching = Teaching(registry, CorrectionStore(self.lab_dir / "corrections.sqlite3"), self.auras,
                                 self.lab_dir)
        self.queue.on_success = self.teaching.finished

    # --- submission -----------------------------------------------------------------------
    def submit(self, kind: str, body: bytes) -> LabJob:
        """Validate everything that can be checked without the model, then queue the job (202)."""
        data = decode_body(body, dict)
        model = data.pop("model", None)
        if not isinstance(model, str) or not model:
            raise InvalidRequestError("`model` is required: the id or alias of a served model.", param="model")
        record = self.registry.resolve(model)
        if is_runner_model(record):  # a custom runner does its own Lab work, in its process
            return self.job(self.queue.submit(kind, record.id, runner_spec(kind, record, data)))
        lab_record(record)  # 400 now, not a failed job later, for a backend without torch weights
        extra = self.teaching.prepare(kind, record.id, data) if kind in TRAIN_KINDS else {}
        decoded = self._spec(kind, data)
        spec = {**msgspec.to_builtins(decoded), **extra}
        if kind == "rollback":
            spec = self._rollback_spec(record.id, spec)
        self._check_memory(kind, record, decoded)
        return self.job(self.queue.submit(kind, record.id, spec))

    def _spec(self, kind: str, data: dict) -> msgspec.Struct:
        try:
            spec_type = ENGINES[kind].spec_type()
        except ImportError as exc:
            raise LabUnavailable(f"The Lab needs torch and transformers: pip install 'omniloader[lab]' ({exc}).") \
                from exc
        return decode_body(msgspec.json.encode(data), spec_type)

    def _rollback_spec(self, model_id: str, spec: dict) -> dict:
        """The snapshot's folder, confined: a job-id-shaped name of a finished snapshot of this model, whose
        folder and manifest resolve (symlinks followed) inside <lab dir>/snapshot/<id>/."""
        if spec["snapshot_dir"]:
            raise InvalidRequestError("`snapshot_dir` is filled in by the server: give only `snapshot`.",
                                      param="snapshot_dir")
        row = self.store.get(spec["snapshot"]) if is_job_id(spec["snapshot"]) else None
        if row is None or row.kind != "snapshot" or row.status != "succeeded":
            raise JobNotFound(f"No snapshot `{spec['snapshot']}`: GET /lab/snapshots lists them.", param="snapshot")
        if row.model != model_id:
            raise InvalidRequestError(f"Snapshot `{row.id}` is of model `{row.model}`, not `{model_id}`.",
                                      param="snapshot")
        folder = job_dir(self.lab_dir, "snapshot", row.id)
        if folder is None or job_file(folder, SNAPSHOT_MANIFEST) is None:
            raise JobNotFound(f"Snapshot `{row.id}` has no manifest in its folder of the Lab dir.", param="snapshot")
        return {**spec, "snapshot_dir": str(folder)}

    def _check_memory(self, kind: str, record, spec: msgspec.Struct) -> None:
        """400 naming the field that weighs most when the job's estimated working memory does not fit."""
        if self._budget_available is None:
            return
        dims = self._dims(record)
        if dims is None:
            return
        need, room = working_memory(kind, spec, dims), self._budget_available(lab_record(record))
        if need <= room:
            return
        field = responsible_field(kind, spec, dims)
        advice = "the model itself is too large for it" if field == "model" else f"lower `{field}`, which weighs most"
        raise InvalidRequestError(
            f"This {kind} job needs about {need >> 20} MiB of working memory beyond the model's weights (estimated "
            f"from the spec and the model's shape: {dims.n_layers} layers, hidden size {dims.d_model}, vocabulary "
            f"{dims.vocab}), more than the {max(room, 0) >> 20} MiB of the memory budget (--max-memory) left once "
            f"the Lab's copy is loaded and idle models give way: {advice}.", param=field, code="lab_job_too_large")

    def _dims(self, record) -> ModelDims | None:
        """The model's shape from its config.json or GGUF header; None when it cannot be read (the load will
        say why), so that only the bounds apply."""
        try:
            return ModelDims.from_config(self._adapter_factory(lab_record(record)).model_config())
        except Exception as exc:  # noqa: BLE001 - best effort: an unreadable shape never blocks a job
            log.debug("lab: no model shape for %s (%s): working memory not checked", record.id, exc)
            return None

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
