"""The sha256 of a model: every file that makes it up hashed in 1 MiB reads, and one aggregate hash
over them that `sha256sum` can reproduce (models/README.md)."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import msgspec

from server.protocol.integrity import FileHash

__all__ = ["CHUNK_SIZE", "ModelHash", "model_files", "file_sha256", "aggregate_sha256", "hash_model_files"]

CHUNK_SIZE = 1 << 20  # hash in 1 MiB reads: multi-GB weights never sit in memory
# Manifests at the top of a model folder describe the model; editing one must not break its lock.
_SKIPPED_TOP_LEVEL = frozenset({"manifest.yaml", "manifest.yml", "manifest.json"})


class ModelHash(msgspec.Struct):
    sha256: str  # aggregate over the sorted (path, file sha256) pairs
    files: list[FileHash]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def model_files(source: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of every file that makes up a model: the file itself, or every file
    under its folder but hidden ones (download caches, lock files) and top-level manifests."""
    if source.is_file():
        return [(source.name, source)]
    if not source.is_dir():
        raise FileNotFoundError(f"{source} does not exist")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        here = Path(dirpath)
        for name in filenames:
            if name.startswith(".") or (here == source and name in _SKIPPED_TOP_LEVEL):
                continue
            found.append(((here / name).relative_to(source).as_posix(), here / name))
    return sorted(found)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def aggregate_sha256(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 of `<file sha256>  <relative path>\\n` lines sorted by path: the text `sha256sum`
    prints for the files listed in C-locale order, so the shell can reproduce it (models/README.md)."""
    lines = "".join(f"{digest}  {rel}\n" for rel, digest in sorted(pairs))
    return hashlib.sha256(lines.encode()).hexdigest()


def hash_model_files(source: Path) -> ModelHash:
    files = [FileHash(rel, path.stat().st_size, file_sha256(path)) for rel, path in model_files(source)]
    if not files:
        raise FileNotFoundError(f"{source} holds no files to hash")
    return ModelHash(aggregate_sha256((f.path, f.sha256) for f in files), files)
