"""The manifest schema (models/<id>/manifest.yaml|json), a ModelRecord (a manifest and where it came
from), decoding one with its backend checked against the adapters table, and resolving its source."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.yaml

from adapters import backends
from adapters.errors import LoadFailed

__all__ = ["MANIFEST_NAMES", "ORIGIN_RANK", "Manifest", "ModelRecord", "decode_manifest", "resolve_source",
           "unknown_backend"]

MANIFEST_NAMES = ("manifest.yaml", "manifest.yml", "manifest.json")
ORIGIN_RANK = {"discovered": 0, "builtin": 1, "curated": 2}  # who wins a shared id; selection order

ModelId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", max_length=200)]


class Manifest(msgspec.Struct, kw_only=True):
    id: ModelId
    backend: str  # a name in adapters.backends(): checked when a manifest is read or registered
    source: str
    aliases: list[str] = []
    roles: list[str] = msgspec.field(default_factory=lambda: ["chat"])
    capabilities: list[str] = []
    context_length: Annotated[int, msgspec.Meta(gt=0)] | None = None
    params: dict[str, Any] = {}  # backend load options (threads, gpu layers, ...)
    defaults: dict[str, Any] = {}  # sampling defaults applied when a request leaves a field out
    description: str = ""
    parallel: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1  # requests served at once (a worker each)
    keep_alive: str | float | None = None  # idle time before unloading ("5m", seconds, -1 = forever)


class ModelRecord(msgspec.Struct, kw_only=True):
    id: str
    origin: Literal["builtin", "curated", "discovered"]
    manifest: Manifest | None = None
    manifest_path: str | None = None
    error: str | None = None

    @property
    def base_dir(self) -> Path:
        return Path(self.manifest_path).parent if self.manifest_path else Path.cwd()

    def source_path(self) -> Path:
        """The model's files on disk (package:// and relative sources resolved)."""
        assert self.manifest is not None
        return resolve_source(self.manifest.source, self.base_dir)

    def local_path(self) -> Path | None:
        """The model's file or folder, or None when it lives behind a URL (vllm_remote)."""
        assert self.manifest is not None
        source = self.manifest.source
        if self.manifest.backend == "vllm_remote" or ("://" in source and not source.startswith("package://")):
            return None
        return self.source_path()


def resolve_source(source: str, base_dir: Path) -> Path:
    """Resolve `package://pkg/rel/path` through importlib (without running the package's code),
    and relative paths against the manifest's folder."""
    if source.startswith("package://"):
        package, _, rel = source.removeprefix("package://").partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise LoadFailed(f"Package `{package}` named by source `{source}` is not installed.")
        return Path(next(iter(spec.submodule_search_locations))) / rel
    path = Path(source).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def unknown_backend(manifest: Manifest) -> str | None:
    """Why the manifest's backend cannot be served (no built-in or plugin of that name), or None."""
    known = backends()
    if manifest.backend in known:
        return None
    return f"Unknown backend `{manifest.backend}`; known backends: {', '.join(sorted(known))}"


def decode_manifest(data: bytes, *, json: bool = False) -> Manifest:
    """A manifest from YAML (or JSON); msgspec.ValidationError names the failing field, an unknown
    backend included."""
    manifest = msgspec.json.decode(data, type=Manifest) if json else msgspec.yaml.decode(data, type=Manifest)
    if problem := unknown_backend(manifest):
        raise msgspec.ValidationError(f"{problem} - at `$.backend`")
    return manifest
