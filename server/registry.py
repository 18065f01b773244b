"""Model registry: manifests -> ModelRecords; discovery of loose GGUF files; id/alias resolution."""
from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.yaml

from server.errors import InvalidRequestError, ModelLoadError, ModelNotFound

__all__ = ["Manifest", "ModelRecord", "Registry", "resolve_source"]

log = logging.getLogger("omniloader.registry")

BUILTIN_DIR = Path(__file__).parent / "builtin_models"
MANIFEST_NAMES = ("manifest.yaml", "manifest.yml", "manifest.json")
DEFAULT_ALIAS = "default"

ModelId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$", max_length=200)]
Backend = Literal["llama_cpp", "hf_transformers", "onnx_runtime", "vllm_remote", "victor_custom"]


class Manifest(msgspec.Struct, kw_only=True):
    id: ModelId
    backend: Backend
    source: str
    aliases: list[str] = []
    roles: list[str] = msgspec.field(default_factory=lambda: ["chat"])
    capabilities: list[str] = []
    context_length: Annotated[int, msgspec.Meta(gt=0)] | None = None
    params: dict[str, Any] = {}  # backend load options (threads, gpu layers, ...)
    defaults: dict[str, Any] = {}  # sampling defaults applied when a request leaves a field out
    description: str = ""


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


def resolve_source(source: str, base_dir: Path) -> Path:
    """Resolve `package://pkg/rel/path` through importlib (without running the package's code),
    and relative paths against the manifest's folder."""
    if source.startswith("package://"):
        package, _, rel = source.removeprefix("package://").partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"Package `{package}` named by source `{source}` is not installed.")
        return Path(next(iter(spec.submodule_search_locations))) / rel
    path = Path(source).expanduser()
    return path if path.is_absolute() else (base_dir / path)


def _decode_manifest(data: bytes, path: Path) -> Manifest:
    if path.suffix == ".json":
        return msgspec.json.decode(data, type=Manifest)
    return msgspec.yaml.decode(data, type=Manifest)


class Registry:
    """One merged view of the built-in, curated (models/*/manifest.*) and discovered models."""

    def __init__(self, models_dir: Path, default_model: str = "smollm2-135m-instruct") -> None:
        self.models_dir = Path(models_dir)
        self.default_model = default_model
        self._records: dict[str, ModelRecord] = {}
        self._aliases: dict[str, str] = {}
        self.scanned_at = int(time.time())

    def scan(self) -> None:
        records: dict[str, ModelRecord] = {}
        for path in sorted(BUILTIN_DIR.glob("*.yaml")):
            self._add(records, self._load_manifest(path, "builtin"))
        manifest_dirs: set[Path] = set()
        if self.models_dir.is_dir():
            for path in sorted(self.models_dir.glob("*/manifest.*")):
                if path.name in MANIFEST_NAMES:
                    manifest_dirs.add(path.parent)
                    self._add(records, self._load_manifest(path, "curated"))
            for path in sorted(self.models_dir.rglob("*.gguf")):
                if not any(d in path.parents for d in manifest_dirs):
                    self._add(records, self._discovered_gguf(path))
        self._records = records
        self._aliases = self._build_aliases(records)
        self.scanned_at = int(time.time())

    def _load_manifest(self, path: Path, origin: str) -> ModelRecord:
        try:
            manifest = _decode_manifest(path.read_bytes(), path)
        except (msgspec.ValidationError, msgspec.DecodeError, OSError) as exc:
            log.warning("skipping bad manifest %s: %s", path, exc)
            return ModelRecord(id=f"invalid:{path.parent.name}/{path.name}", origin=origin,
                               manifest_path=str(path), error=str(exc))
        return ModelRecord(id=manifest.id, origin=origin, manifest=manifest, manifest_path=str(path))

    @staticmethod
    def _discovered_gguf(path: Path) -> ModelRecord:
        manifest = Manifest(id=path.stem, backend="llama_cpp", source=str(path.resolve()),
                            capabilities=["chat", "completion"])
        return ModelRecord(id=manifest.id, origin="discovered", manifest=manifest)

    @staticmethod
    def _add(records: dict[str, ModelRecord], record: ModelRecord) -> None:
        existing = records.get(record.id)
        rank = {"discovered": 0, "builtin": 1, "curated": 2}
        if existing is not None and existing.manifest is not None:
            if rank[record.origin] < rank[existing.origin]:
                return
            if rank[record.origin] == rank[existing.origin]:
                log.warning("duplicate model id %s in %s (kept %s)", record.id, record.manifest_path,
                            existing.manifest_path)
                return
        records[record.id] = record

    @staticmethod
    def _build_aliases(records: dict[str, ModelRecord]) -> dict[str, str]:
        aliases: dict[str, str] = {}
        for record in records.values():
            for alias in record.manifest.aliases if record.manifest else ():
                if alias in records or alias in aliases:
                    log.warning("alias %s of %s is taken; ignored", alias, record.id)
                else:
                    aliases[alias] = record.id
        return aliases

    def records(self) -> list[ModelRecord]:
        return list(self._records.values())

    def usable(self) -> list[ModelRecord]:
        return [r for r in self._records.values() if r.manifest is not None]

    def get(self, model_id: str) -> ModelRecord:
        record = self._records.get(model_id)
        if record is None or record.manifest is None:
            raise ModelNotFound(model_id)
        return record

    def resolve(self, name: str) -> ModelRecord:
        """A request's `model` (id, alias, or `default`) -> its record; 404 model_not_found otherwise."""
        if name == DEFAULT_ALIAS:
            name = self.default_model
        return self.get(self._aliases.get(name, name))

    def register(self, body: bytes) -> ModelRecord:
        """Validate a manifest (JSON body), write it to models/<id>/manifest.json and add it."""
        try:
            manifest = msgspec.json.decode(body, type=Manifest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidRequestError(f"Invalid manifest: {exc}") from None
        existing = self._records.get(manifest.id)
        if existing is not None and existing.origin == "builtin":
            raise InvalidRequestError(f"`{manifest.id}` is a built-in model id.", param="id")
        if "://" not in manifest.source:
            manifest.source = str(Path(manifest.source).expanduser().resolve())
        path = self.models_dir / manifest.id / "manifest.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))
        tmp.replace(path)  # atomic: a crash never leaves half a manifest
        self.scan()
        return self.get(manifest.id)
