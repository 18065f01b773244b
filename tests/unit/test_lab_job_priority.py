"""Lab job threads run niced (Linux), and so do the threads a job starts (torch's OpenMP pool is started
from the job thread): chat keeps the cores it needs while a job computes."""
import os
import sys
import threading
import time
from types import SimpleNamespace

import msgspec
import pytest

import lab_engines
from server.lab.job_queue import JOB_NICENESS, JobQueue
from server.lab.job_store import JobStore

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")


class ProbeSpec(msgspec.Struct):
    pass


def run_probe(view, spec, ctx) -> dict:
    """Reports its own thread's nice value and that of a thread it starts."""
    seen = {}

    def note() -> None:
        seen["child"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    child = threading.Thread(target=note)
    child.start()
    child.join()
    return {"job": os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), **seen}


class FakeModels:
    def checkout(self, model_id, progress=None):
        return SimpleNamespace(view=None)

    def checkin(self, copy):
        pass

    def close(self):
        pass


def test_jobs_and_the_threads_they_start_run_niced(tmp_path, monkeypatch):
    monkeypatch.setitem(lab_engines.ENGINES, "probe", lab_engines.Engine(
        "probe", f"{__name__}:ProbeSpec", f"{__name__}:run_probe"))
    store = JobStore(tmp_path / "jobs.sqlite3")
    queue = JobQueue(store, FakeModels(), tmp_path)
    queue.start()
    try:
        job = queue.submit("probe", "m", {})
        deadline = time.monotonic() + 10
        while store.get(job.id).status != "succeeded" and time.monotonic() < deadline:
            time.sleep(0.01)
        result = store.get(job.id).result
    finally:
        queue.close()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert result == {"job": min(base + JOB_NICENESS, 19), "child": min(base + JOB_NICENESS, 19)}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller's thread untouched
