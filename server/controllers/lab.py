"""/lab: Lab jobs (diagnostics, trace, causal tests, snapshots), their progress and artifacts.

Every action that computes returns 202 with the queued job at once; the job queue runs it."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from litestar import Controller, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery
from litestar.response import File, Stream

from lab_engines import ENGINES
from server.controllers.auth import require_api_key
from server.errors import InvalidRequestError, JobNotFound
from server.lab.artifacts import artifact_file, is_job_id, list_artifacts
from server.lab.service import Lab
from server.runtime import ModelPool
from server.protocol.corrections import Correction, CorrectionDeleted, CorrectionList
from server.protocol.lab import ArtifactList, LabJob, LabJobList, LabModelCopy, LabModelList, SnapshotList
from server.serving.sse import DONE, SSE_HEADERS, event

__all__ = ["LabController"]

EVENT_POLL = 0.1  # seconds between looks at a running job's progress
HEARTBEAT = 15.0  # an SSE comment this often keeps proxies from closing a quiet stream
_MEDIA = {".json": "application/json", ".md": "text/markdown; charset=utf-8", ".png": "image/png",
          ".txt": "text/plain; charset=utf-8"}


class LabController(Controller):
    path = "/lab"
    guards = [require_api_key]

    # --- actions (202 + job) -----------------------------------------------------------
    @post("/diagnostics/run", status_code=202, sync_to_thread=True)
    def diagnostics(self, lab: NamedDependency[Lab], body: bytes) -> LabJob:
        return lab.submit("diagnostics", body)

    @post("/trace", status_code=202, sync_to_thread=True)
    def trace(self, lab: NamedDependency[Lab], body: bytes) -> LabJob:
        return lab.submit("trace", body)

    @post("/causal_test", status_code=202, sync_to_thread=True)
    def causal_test(self, lab: NamedDependency[Lab], body: bytes) -> LabJob:
        return lab.submit("causal_test", body)

    @post("/snapshot", status_code=202, sync_to_thread=True)
    def snapshot(self, lab: NamedDependency[Lab], body: bytes) -> LabJob:
        return lab.submit("snapshot", body)

    @post("/rollback", status_code=202, sync_to_thread=True)
    def rollback(self, lab: NamedDependency[Lab], body: bytes) -> LabJob:
        return lab.submit("rollback", body)

    @post("/train/target", status_code=202, sync_to_thread=True)
    def train_target(self, lab: NamedDependency[Lab], body: bytes) -> LabJob:
        return lab.submit("train_target", body)

    @post("/train/live", status_code=202, sync_to_thread=True)
    def train_live(self, lab: NamedDependency[Lab], body: bytes) -> LabJob:
        return lab.submit("train_live", body)

    # --- the correction queue -----------------------------------------------------------
    @post("/queue", status_code=200, sync_to_thread=True)
    def queue_correction(self, lab: NamedDependency[Lab], body: bytes) -> Correction:
        return lab.teaching.queue(body)

    @get("/queue", sync_to_thread=True)
    def corrections(self, lab: NamedDependency[Lab], model: FromQuery[str | None] = None) -> CorrectionList:
        return CorrectionList(data=lab.teaching.listed(model))

    @delete("/queue/{correction_id:str}", status_code=200, sync_to_thread=True)
    def delete_correction(self, lab: NamedDependency[Lab], correction_id: FromPath[str]) -> CorrectionDeleted:
        lab.teaching.delete(correction_id)
        return CorrectionDeleted(id=correction_id)

    # --- reading ----------------------------------------------------------------------
    @get("/diagnostics/report", sync_to_thread=True)
    def report(self, lab: NamedDependency[Lab], model: FromQuery[str], format: FromQuery[str] = "json") -> Response:
        """The latest finished diagnostics of a model: its JSON result, or ?format=markdown for report.md."""
        row = lab.latest_report(model)
        if format == "markdown":
            path = artifact_file(lab.lab_dir, f"diagnostics/{row.id}/report.md")  # confined: see artifacts.py
            if path is None:
                raise JobNotFound(f"Diagnostics job `{row.id}` has no report.md.", param="format")
            return Response(path.read_text(), media_type=_MEDIA[".md"])
        return Response({"model": row.model, "job": row.id, "created_at": row.created_at, "spec": row.spec,
                         "report": row.result, "artifacts": lab.job(row).artifacts})

    @get("/models")
    async def models(self, lab: NamedDependency[Lab], pool: NamedDependency[ModelPool]) -> LabModelList:
        copies = [LabModelCopy(**c) for c in lab.models.copies()]
        return LabModelList(data=copies, memory_budget_bytes=pool.config.max_memory,
                            memory_used_bytes=pool.used_memory())

    @get("/snapshots", sync_to_thread=True)
    def snapshots(self, lab: NamedDependency[Lab], model: FromQuery[str | None] = None) -> SnapshotList:
        return SnapshotList(data=lab.snapshots(model))

    @get("/jobs", sync_to_thread=True)
    def jobs(self, lab: NamedDependency[Lab], status: FromQuery[str | None] = None, kind: FromQuery[str | None] = None,
             model: FromQuery[str | None] = None, limit: FromQuery[int] = 100) -> LabJobList:
        model_id = lab.registry.resolve(model).id if model else None
        rows = lab.store.list(status=status, kind=kind, model=model_id, limit=max(1, min(limit, 1000)))
        return LabJobList(data=[lab.job(r) for r in rows])

    @get("/jobs/{job_id:str}", sync_to_thread=True)
    def job(self, lab: NamedDependency[Lab], job_id: FromPath[str]) -> LabJob:
        return lab.job(lab.row(job_id))

    @delete("/jobs/{job_id:str}", status_code=200, sync_to_thread=True)
    def cancel(self, lab: NamedDependency[Lab], job_id: FromPath[str]) -> LabJob:
        """Cancel: a queued job never starts; a running one stops at its engine's next check."""
        lab.row(job_id)
        return lab.job(lab.queue.cancel(job_id))

    @get("/jobs/{job_id:str}/events")
    async def events(self, lab: NamedDependency[Lab], job_id: FromPath[str]) -> Stream:
        """SSE: a progress event whenever the job's status, stage, progress or message changes, then the
        final job object and [DONE]."""
        await asyncio.to_thread(lab.row, job_id)
        return Stream(_job_events(lab, job_id), media_type="text/event-stream", headers=SSE_HEADERS)

    @get("/artifacts", sync_to_thread=True)
    def artifacts(self, lab: NamedDependency[Lab], kind: FromQuery[str | None] = None,
                  job: FromQuery[str | None] = None) -> ArtifactList:
        if kind is not None and kind not in ENGINES:
            raise InvalidRequestError(f"Unknown kind `{kind}`: one of {', '.join(sorted(ENGINES))}.", param="kind")
        if job is not None and not is_job_id(job):
            raise InvalidRequestError(f"`{job}` is not a Lab job id (job_…).", param="job")
        return ArtifactList(data=list_artifacts(lab.lab_dir, kind=kind, job=job))

    @get("/artifacts/{path:path}", sync_to_thread=True)
    def artifact(self, lab: NamedDependency[Lab], path: FromPath[str]) -> File:
        found = artifact_file(lab.lab_dir, path)
        if found is None:
            raise JobNotFound(f"No artifact `{path.lstrip('/')}`: GET /lab/artifacts lists them.", param="path")
        return File(found, media_type=_MEDIA.get(found.suffix, "application/octet-stream"),
                    content_disposition_type="inline")


async def _job_events(lab: Lab, job_id: str) -> AsyncIterator[bytes]:
    last, quiet_since = None, time.monotonic()
    while True:
        live = lab.queue.live(job_id)
        if live is None or live.status == "done":
            break
        current = live.event()
        key = (current["status"], current["stage"], current["progress"], current["message"])
        if key != last:
            last, quiet_since = key, time.monotonic()
            yield event(current)
        elif time.monotonic() - quiet_since > HEARTBEAT:
            quiet_since = time.monotonic()
            yield b": still working\n\n"
        await asyncio.sleep(EVENT_POLL)
    final = await asyncio.to_thread(lab.row, job_id)
    yield event({"object": "lab.job.event", "id": job_id, "kind": final.kind, "model": final.model,
                 "status": final.status, "stage": "done", "progress": final.progress, "message": final.message,
                 "job": lab.job(final)})
    yield DONE
