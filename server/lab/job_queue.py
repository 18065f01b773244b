"""The Lab's background job queue.

Jobs run on worker threads (never the event loop), FIFO, at most `jobs_per_model` at once per model
(each running job holds its own Lab copy of the model) and `max_running` at once overall. Progress
lives in memory for the SSE stream and is written to SQLite at most once a second; status changes
are written at once. Cancellation is cooperative: the engine stops at its next ctx.check().

Job threads run at a lower CPU priority (nice +JOB_NICENESS, Linux: per thread, inherited by the
OpenMP threads torch starts from them), so chat keeps its speed while a job computes and the job
takes the cores whenever chat is idle."""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgspec

from lab_engines import ENGINES
from lab_engines.context import JobCancelled, JobContext
from adapters.errors import EngineError
from server.errors import OpenAIError, from_engine
from server.lab.job_store import JobRow, JobStore
from server.lab.lab_models import LabModels
from server.lab.runner_jobs import RUNNER_KEY, as_result, runner_call

__all__ = ["STORE_DIR", "JobQueue", "LiveJob"]

log = logging.getLogger("omniloader.lab")

STORE_DIR = "store"  # under the lab dir: data shared between jobs (snapshot blobs)
PERSIST_EVERY = 1.0  # seconds between progress writes to SQLite
JOB_NICENESS = 10


class LiveJob:
    """What the queue knows about a queued or running job beyond its row."""

    def __init__(self, row: JobRow) -> None:
        self.row = row
        self.status = row.status
        self.stage = "queued"  # queued | loading | running
        self.progress = 0.0
        self.message = ""
        self.ctx: JobContext | None = None
        self.cancel_requested = False
        self.started = time.monotonic()
        self._persisted = 0.0

    def event(self) -> dict:
        return {"object": "lab.job.event", "id": self.row.id, "kind": self.row.kind, "model": self.row.model,
                "status": self.status, "stage": self.stage, "progress": round(self.progress, 4),
                "message": self.message, "elapsed": round(time.monotonic() - self.started, 1)}


def _error(exc: BaseException) -> dict:
    if isinstance(exc, EngineError):
        exc = from_engine(exc)
    if isinstance(exc, OpenAIError):
        return {"message": exc.message, "type": exc.type, "code": exc.code, "param": exc.param}
    if isinstance(exc, ValueError):
        return {"message": str(exc), "type": "invalid_request_error", "code": "invalid_lab_input", "param": None}
    return {"message": f"The job failed: {type(exc).__name__}: {exc}", "type": "server_error",
            "code": "lab_job_failed", "param": None}


class JobQueue:
    def __init__(self, store: JobStore, models: LabModels, lab_dir: Path, *, jobs_per_model: int = 1,
                 max_running: int = 2) -> None:
        self.store = store
        self.models = models
        self.lab_dir = Path(lab_dir)
        self.jobs_per_model = max(1, jobs_per_model)
        self.max_running = max(1, max_running)
        self._pending: list[LiveJob] = []
        self._live: dict[str, LiveJob] = {}
        self._running: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._closed = False
        self._threads: list[threading.Thread] = []
        # Called with (row, result) when a job succeeds; what it returns is added to the stored result.
        self.on_success: Callable[[JobRow, dict], dict] | None = None

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        interrupted = self.store.interrupt_running()
        if interrupted:
            log.warning("lab: %d job(s) were running when the server last stopped: marked interrupted", interrupted)
        for row in reversed(self.store.list(status="queued", limit=100_000)):  # oldest first
            self._enqueue(row)
        for i in range(self.max_running):
            thread = threading.Thread(target=self._work, name=f"lab-job-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            for live in self._live.values():
                if live.ctx is not None:
                    live.ctx.cancel()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    # --- requests -------------------------------------------------------------------------
    def submit(self, kind: str, model: str, spec: dict) -> JobRow:
        row = self.store.create(f"job_{uuid.uuid4().hex[:24]}", kind, model, spec)
        self._enqueue(row)
        return row

    def cancel(self, job_id: str) -> JobRow | None:
        with self._cond:
            live = self._live.get(job_id)
            if live is not None and live.status == "queued":
                self._pending.remove(live)
                del self._live[job_id]
                self.store.finish(job_id, "cancelled", message="cancelled before it started")
            elif live is not None:
                live.cancel_requested = True
                live.message = "cancelling"
                if live.ctx is not None:
                    live.ctx.cancel()
        return self.store.get(job_id)

    def live(self, job_id: str) -> LiveJob | None:
        return self._live.get(job_id)

    # --- workers --------------------------------------------------------------------------
    def _enqueue(self, row: JobRow) -> None:
        with self._cond:
            live = LiveJob(row)
            self._live[row.id] = live
            self._pending.append(live)
            self._cond.notify_all()

    def _next(self) -> LiveJob | None:
        with self._cond:
            while not self._closed:
                live = next((j for j in self._pending if self._running[j.row.model] < self.jobs_per_model), None)
                if live is not None:
                    self._pending.remove(live)
                    self._running[live.row.model] += 1
                    return live
                self._cond.wait()
        return None

    def _work(self) -> None:
        _lower_priority()
        while (live := self._next()) is not None:
            try:
                self._run(live)
            except Exception:  # the queue must outlive any job
                log.exception("lab: job %s crashed the runner", live.row.id)
            finally:
                with self._cond:
                    self._running[live.row.model] -= 1
                    self._live.pop(live.row.id, None)
                    self._cond.notify_all()

    def _on_progress(self, live: LiveJob, fraction: float, message: str) -> None:
        live.progress, live.message = fraction, message
        now = time.monotonic()
        if now - live._persisted >= PERSIST_EVERY:
            live._persisted = now
            self.store.set_progress(live.row.id, fraction, message)

    def _run(self, live: LiveJob) -> None:
        row = live.row
        if not self.store.mark_running(row.id):
            return  # cancelled meanwhile
        live.status, live.started = "running", time.monotonic()
        ctx = JobContext(self.lab_dir / row.kind / row.id, lambda f, m: self._on_progress(live, f, m),
                         store_dir=self.lab_dir / STORE_DIR)
        live.ctx = ctx
        if live.cancel_requested or self._closed:
            ctx.cancel()
        copy = None
        try:
            if RUNNER_KEY in row.spec:  # a custom runner's own Lab function, in its process
                live.stage = "running"
                result = as_result(self.models.call_runner(row.model, *runner_call(row.spec)))
            else:
                engine = ENGINES[row.kind]
                spec = msgspec.convert(row.spec, engine.spec_type())
                live.stage, live.message = "loading", f"loading {row.model} for the Lab"
                copy = self.models.checkout(row.model, lambda f: setattr(live, "message", f"loading {f:.0%}"))
                ctx.check()
                live.stage = "running"
                result = engine.runner()(copy.view, spec, ctx)
                if result.get("restored_identical") is False:  # an edit the engine could not undo: never reuse
                    self.models.discard(copy)
                    copy = None
            artifacts = [f"{row.kind}/{row.id}/{name}" for name in result.get("artifacts", [])]
            if self.on_success is not None:
                result = {**result, **self.on_success(row, result)}
            try:
                self.store.finish(row.id, "succeeded", result=result, artifacts=artifacts, progress=1.0,
                                  message=live.message or "done")
            except (NotImplementedError, TypeError) as exc:  # an engine bug: the job must still end
                raise RuntimeError(f"the result could not be stored: {exc}") from exc
            log.info("lab: %s %s on %s succeeded in %.1fs", row.kind, row.id, row.model,
                     time.monotonic() - live.started)
        except JobCancelled:
            self.store.finish(row.id, "cancelled", progress=live.progress, message="cancelled")
            log.info("lab: %s %s cancelled", row.kind, row.id)
        except Exception as exc:
            if not isinstance(exc, ValueError | OpenAIError | EngineError):
                log.exception("lab: %s %s failed", row.kind, row.id)
            self.store.finish(row.id, "failed", error=_error(exc), progress=live.progress, message="failed")
        finally:
            live.status = "done"
            if copy is not None:
                self.models.checkin(copy)


def _lower_priority() -> None:
    """Nice this thread (and the threads it starts) by JOB_NICENESS; a no-op where threads cannot be niced."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + JOB_NICENESS, 19))
    except (AttributeError, OSError) as exc:
        log.debug("lab: job threads keep their priority (%s)", exc)
