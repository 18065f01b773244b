"""The aura store's file primitives: atomic writes (a temp file in the same folder, fsynced, then
renamed: a crash leaves the old file or the new one, never half of one), hashed copies, and two
sha256 caches keyed by what a change to a file changes (inode, size, mtime and ctime, which no
write or utime leaves as it was), so a request re-hashes nothing that did not change."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path

from adapters.overlay import file_sha256
from server.registry import ModelRecord
from server.registry.hashing import hash_model_files, model_files

__all__ = ["write_atomic", "copy_hashed", "FileHashes", "BaseHashes"]

log = logging.getLogger("omniloader.auras")
CHUNK = 1 << 20


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def copy_hashed(src: Path, dst: Path) -> str:
    """Copy src to dst atomically; the sha256 of the bytes written."""
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dst.parent)
    try:
        with open(src, "rb") as source, os.fdopen(fd, "wb") as out:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def _signature(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class FileHashes:
    """sha256 of files, re-hashed only when their signature changes."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple, str]] = {}
        self._lock = threading.Lock()

    def sha256(self, path: Path) -> str:
        key, sig = str(path), _signature(path)
        with self._lock:
            known = self._known.get(key)
        if known is not None and known[0] == sig:
            return known[1]
        digest = file_sha256(path)
        with self._lock:
            self._known[key] = (sig, digest)
        return digest


class BaseHashes:
    """The aggregate sha256 of a model's files (server/registry/hashing.py, the value `omniloader models
    verify` prints), cached in memory and in a JSON file (hashing a large model takes a while) and
    recomputed when any file's size or mtime changed. None for a model without local files."""

    def __init__(self, cache_file: Path) -> None:
        self._file = cache_file
        self._lock = threading.Lock()
        self._known: dict[str, dict] | None = None

    def _load(self) -> dict[str, dict]:
        if self._known is None:
            try:
                known = json.loads(self._file.read_text())
                self._known = known if isinstance(known, dict) else {}
            except (OSError, ValueError):
                self._known = {}
        return self._known

    def sha256(self, record: ModelRecord) -> str | None:
        source = record.local_path()
        if source is None:
            return None
        try:
            files = model_files(source)
            signature = [[rel, p.stat().st_size, p.stat().st_mtime_ns] for rel, p in files]
        except OSError:
            return None
        with self._lock:
            entry = self._load().get(record.id)
        if entry and entry.get("path") == str(source) and entry.get("files") == signature:
            return entry["sha256"]
        digest = hash_model_files(source).sha256
        log.info("hashed %s for its auras: %s", record.id, digest)
        with self._lock:
            known = self._load()
            known[record.id] = {"path": str(source), "files": signature, "sha256": digest}
            try:
                self._file.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(self._file, json.dumps(known, indent=1).encode())
            except OSError as exc:  # a read-only Lab dir only costs re-hashing after a restart
                log.warning("cannot record base hashes in %s: %s", self._file, exc)
        return digest
