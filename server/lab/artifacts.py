"""The artifact store: each job's files live under <lab dir>/<kind>/<job-id>/.

Every path a request names is confined before anything is read: the kind must be a known engine
kind, the job a job-id-shaped name, the folder <lab dir>/<kind>/<job-id> must resolve to exactly that
place (no symlinked kind or job folder), and every file listed or served must resolve, symlinks
followed, inside its job folder. Nothing else under the lab dir (the job database, the snapshot
blob store) and nothing outside it is ever listed or served."""
from __future__ import annotations

import os
import re
from pathlib import Path

from lab_engines import ENGINES
from server.protocol.lab import Artifact

__all__ = ["ARTIFACTS_URL", "JOB_ID", "artifact_file", "is_job_id", "job_dir", "job_file", "list_artifacts"]

ARTIFACTS_URL = "/lab/artifacts/"
JOB_ID = re.compile(r"job_[A-Za-z0-9]{1,64}")  # what JobQueue.submit issues: job_<hex>
_BAD_PART = re.compile(r"[\\:\x00]")  # Windows separators and drive/stream colons, NUL


def is_job_id(name: object) -> bool:
    return isinstance(name, str) and JOB_ID.fullmatch(name) is not None


def _inside(path: Path, root: Path) -> bool:
    """path (resolved) is root or below it, compared part by part."""
    return path == root or root in path.parents


def job_dir(lab_dir: Path, kind: str, job: str) -> Path | None:
    """The resolved folder of job `job` of kind `kind`, or None: an unknown kind, a name that is not a job
    id, a folder that does not exist, or one that resolves anywhere but <lab dir>/<kind>/<job>."""
    if kind not in ENGINES or not is_job_id(job):
        return None
    root = Path(lab_dir).resolve()
    folder = (root / kind / job).resolve()
    if folder != root / kind / job or not folder.is_dir():  # a symlinked kind or job folder
        return None
    return folder


def job_file(folder: Path, rel: str) -> Path | None:
    """The file `rel` (a/b/c, relative) inside the resolved job folder, or None if it is not a regular file
    that resolves, symlinks followed, inside that folder."""
    parts = rel.split("/")
    if any(p in ("", ".", "..") or _BAD_PART.search(p) for p in parts):
        return None
    path = folder.joinpath(*parts).resolve()
    if not _inside(path, folder) or path == folder or not path.is_file():
        return None
    return path


def artifact_file(lab_dir: Path, rel: str) -> Path | None:
    """The file for an artifact path <kind>/<job-id>/<file...> (one leading / allowed), or None if it is not
    an artifact (or does not exist)."""
    parts = rel[1:].split("/", 2) if rel.startswith("/") else rel.split("/", 2)
    if len(parts) < 3:
        return None
    kind, job, name = parts
    folder = job_dir(lab_dir, kind, job)
    return None if folder is None else job_file(folder, name)


def _files(folder: Path) -> list[Path]:
    """Regular files under folder that resolve inside it (symlinked folders are not followed)."""
    found = []
    for here, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            rel = (Path(here) / name).relative_to(folder).as_posix()
            if job_file(folder, rel) is not None:
                found.append(folder / rel)
    return found


def list_artifacts(lab_dir: Path, *, kind: str | None = None, job: str | None = None) -> list[Artifact]:
    """Artifacts of every job (of `kind`, of `job`). The caller checks kind and job (known kind, job id)."""
    root = Path(lab_dir).resolve()
    found = []
    for k in [kind] if kind else sorted(ENGINES):
        base = root / k
        if k not in ENGINES or not base.is_dir():
            continue
        names = [job] if job else sorted(d.name for d in base.iterdir())
        for name in names:
            folder = job_dir(root, k, name)
            if folder is None:
                continue
            for path in _files(folder):
                rel = path.relative_to(root).as_posix()
                stat = path.stat()
                found.append(Artifact(path=rel, url=ARTIFACTS_URL + rel, bytes=stat.st_size, modified=stat.st_mtime,
                                      job=name, kind=k))
    return found
