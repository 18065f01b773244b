"""Wire types of /lab: jobs, their events, artifacts and snapshots."""
from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["Artifact", "ArtifactList", "LabJob", "LabJobList", "LabModelCopy", "LabModelList", "Snapshot", "SnapshotList"]


class LabJob(msgspec.Struct, kw_only=True, omit_defaults=False):
    id: str
    kind: str
    model: str
    status: str  # queued | running | succeeded | failed | cancelled | interrupted
    progress: float
    message: str
    spec: dict[str, Any]
    created_at: float
    started_at: float | None
    finished_at: float | None
    duration_s: float | None
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    artifacts: list[str]  # URLs under /lab/artifacts/
    object: Literal["lab.job"] = "lab.job"


class LabJobList(msgspec.Struct):
    data: list[LabJob]
    object: Literal["list"] = "list"


class Artifact(msgspec.Struct):
    path: str  # relative to the lab dir: <kind>/<job-id>/<file>
    url: str
    bytes: int
    modified: float
    job: str
    kind: str


class ArtifactList(msgspec.Struct):
    data: list[Artifact]
    object: Literal["list"] = "list"


class Snapshot(msgspec.Struct, kw_only=True):
    id: str  # the id of the job that took it
    model: str
    created_at: float
    weights_digest: str
    n_tensors: int
    bytes: int
    note: str = ""
    object: Literal["lab.snapshot"] = "lab.snapshot"


class SnapshotList(msgspec.Struct):
    data: list[Snapshot]
    object: Literal["list"] = "list"


class LabModelCopy(msgspec.Struct):
    model: str
    state: Literal["busy", "idle"]  # busy: a job has it checked out
    memory_bytes: int  # what it holds of the memory budget (--max-memory)
    idle_s: float


class LabModelList(msgspec.Struct):
    """GET /lab/models: the Lab's loaded torch copies, and the budget they share with served models."""
    data: list[LabModelCopy]
    memory_budget_bytes: int
    memory_used_bytes: int  # served models and Lab copies together
    object: Literal["list"] = "list"
