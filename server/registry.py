"""Model registry: manifests -> ModelRecords; layered discovery (curated manifests, loose GGUF files,
HF and ONNX folders); resolution by id, alias or role; capability-aware selection; integrity hooks."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.yaml

from adapters.errors import EngineError, LoadFailed
from server.errors import InvalidRequestError, ModelNotFound, OpenAIError
from server.registry_state import STATE_FILE, ModelIntegrity, RegistryState

__all__ = ["Manifest", "ModelRecord", "Registry", "resolve_source", "Rejection", "Selection",
           "SelectionResult", "NoModelQualifies", "ROLE_PREFIX"]

log = logging.getLogger("omniloader.registry")

BUILTIN_DIR = Path(__file__).parent / "builtin_models"
VICTOR_DIR = Path(__file__).resolve().parents[1] / "victor"  # the example custom backend (victor/manifest.yaml)
MANIFEST_NAMES = ("manifest.yaml", "manifest.yml", "manifest.json")
DEFAULT_ALIAS = "default"
ROLE_PREFIX = "role:"
ORIGIN_RANK = {"discovered": 0, "builtin": 1, "curated": 2}  # who wins a shared id; selection order
# What llama.cpp gives any GGUF it can load (adapters/llama_cpp.py): a discovered GGUF advertises it.
GGUF_CAPABILITIES = ["chat", "completion", "tools", "json_schema", "logprobs", "embeddings"]
_GENERATIVE_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")

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


class Rejection(msgspec.Struct):
    id: str
    reason: str


class SelectionResult(msgspec.Struct):
    """GET /api/models/select: the chosen model id, why, and who was passed over and why."""
    model: str
    reason: str
    rejected: list[Rejection] = []


class Selection(msgspec.Struct):
    record: ModelRecord
    reason: str
    rejected: list[Rejection] = []

    def result(self) -> SelectionResult:
        return SelectionResult(self.record.id, self.reason, self.rejected)


class NoModelQualifies(ModelNotFound):
    """404 model_not_found whose message says why every candidate was turned down."""

    def __init__(self, query: str, detail: str, rejected: list[Rejection]) -> None:
        OpenAIError.__init__(self, f"No model qualifies for `{query}`: {detail}", param="model")
        self.rejected = rejected


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


def _decode_manifest(data: bytes, path: Path) -> Manifest:
    if path.suffix == ".json":
        return msgspec.json.decode(data, type=Manifest)
    return msgspec.yaml.decode(data, type=Manifest)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _dir_backend(folder: Path, filenames: list[str]) -> str | None:
    """An HF folder (config.json + weights) or an ONNX folder (*.onnx here or in onnx/)."""
    if "config.json" in filenames and any(
            n.endswith(".safetensors") or (n.startswith("pytorch_model") and n.endswith(".bin")) for n in filenames):
        return "hf_transformers"
    if any(n.endswith(".onnx") for n in filenames) or any((folder / "onnx").glob("*.onnx")):
        return "onnx_runtime"
    return None


def _dir_model_id(folder: Path) -> str:
    # A Hugging Face cache snapshot (models--org--name/snapshots/<rev>) is named after its repo.
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.removeprefix("models--")
    return folder.name


def _discovered_dir(folder: Path, backend: str) -> ModelRecord:
    """Roles and capabilities of a folder model from its config.json and tokenizer_config.json."""
    config = _read_json(folder / "config.json")
    template = _read_json(folder / "tokenizer_config.json").get("chat_template") or (
        folder / "chat_template.jinja").is_file()
    architectures = config.get("architectures") or []
    generative = not architectures or any(a.endswith(_GENERATIVE_HEADS) for a in architectures)
    if generative:
        capabilities = ["chat", "completion"] if template else ["completion"]
        roles = ["chat"] if template else ["completion"]
    else:  # an encoder (BertModel, ...): embeddings only
        capabilities, roles = ["embeddings"], ["embed"]
    context = config.get("max_position_embeddings") or config.get("n_positions")
    manifest = Manifest(id=_dir_model_id(folder), backend=backend, source=str(folder.absolute()), roles=roles,
                        capabilities=capabilities,
                        context_length=context if isinstance(context, int) and context > 0 else None)
    return ModelRecord(id=manifest.id, origin="discovered", manifest=manifest)


def _requirements(require: Iterable[str] | str | None) -> list[str]:
    """`["tools,json_schema", "logprobs"]` -> `["tools", "json_schema", "logprobs"]` (order kept)."""
    items = [require] if isinstance(require, str) else list(require or ())
    return list(dict.fromkeys(c.strip() for item in items for c in item.split(",") if c.strip()))


class Registry:
    """One merged view of the built-in, curated (models/*/manifest.*) and discovered models,
    plus (with a lab_dir) their persistent state: hashes, locks, usage."""

    def __init__(self, models_dir: Path, default_model: str = "smollm2-135m-instruct",
                 lab_dir: Path | None = None, victor_dir: Path | None = VICTOR_DIR) -> None:
        self.models_dir = Path(models_dir)
        self.victor_dir = Path(victor_dir) if victor_dir is not None else None  # None: not scanned
        self.default_model = default_model
        self._records: dict[str, ModelRecord] = {}
        self._aliases: dict[str, str] = {}
        self.scanned_at = int(time.time())
        self.state = RegistryState(Path(lab_dir) / STATE_FILE) if lab_dir is not None else None
        self.integrity = ModelIntegrity(self.state) if self.state is not None else None

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
            self._discover(records, manifest_dirs)
        if self.victor_dir is not None:  # a curated manifest in models/ with the same id wins
            for path in (self.victor_dir / name for name in MANIFEST_NAMES):
                if path.is_file():
                    self._add(records, self._load_manifest(path, "curated"))
                    break
        self._records = records
        self._aliases = self._build_aliases(records)
        self.scanned_at = int(time.time())
        log.info("scanned %s: %d models", self.models_dir, len(records))

    def _discover(self, records: dict[str, ModelRecord], manifest_dirs: set[Path]) -> None:
        """Walk models/ (following symlinks, once per real folder): loose GGUF files anywhere, HF and
        ONNX folders outside curated ones; a claimed folder's subfolders are not models of their own."""
        claimed: list[Path] = []
        seen: set[Path] = set()
        for dirpath, dirnames, filenames in os.walk(self.models_dir, followlinks=True):
            here = Path(dirpath)
            if here.resolve() in seen:  # a symlink loop or a second link to the same folder
                dirnames[:] = []
                continue
            seen.add(here.resolve())
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and here / d not in manifest_dirs)
            inside = any(c == here or c in here.parents for c in claimed)
            if here != self.models_dir and not inside and (backend := _dir_backend(here, filenames)):
                claimed.append(here)
                self._add(records, _discovered_dir(here, backend))
            for name in sorted(filenames):
                if name.endswith(".gguf"):
                    self._add(records, self._discovered_gguf(here / name))

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
        # absolute(), not resolve(): a symlinked GGUF keeps the name the user gave it (and hashes under it)
        manifest = Manifest(id=path.stem, backend="llama_cpp", source=str(path.absolute()),
                            capabilities=list(GGUF_CAPABILITIES))
        return ModelRecord(id=manifest.id, origin="discovered", manifest=manifest)

    @staticmethod
    def _add(records: dict[str, ModelRecord], record: ModelRecord) -> None:
        existing = records.get(record.id)
        if existing is not None and existing.manifest is not None:
            if ORIGIN_RANK[record.origin] < ORIGIN_RANK[existing.origin]:
                return
            if ORIGIN_RANK[record.origin] == ORIGIN_RANK[existing.origin]:
                log.warning("duplicate model id %s in %s (kept %s)", record.id,
                            record.manifest_path or record.manifest.source,
                            existing.manifest_path or existing.manifest.source)
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
        """A request's `model` (id, alias, `default` or `role:<role>`) -> its record; 404 otherwise."""
        if name == DEFAULT_ALIAS:
            name = self.default_model
        target = self._aliases.get(name, name)
        if target not in self._records and name.startswith(ROLE_PREFIX):
            return self.select(name).record
        return self.get(target)

    def select(self, name_or_role: str, require: Iterable[str] | str | None = None) -> Selection:
        """The model for an id/alias or `role:<role>` that has every required capability. For a role:
        the default model if it qualifies, then curated before built-in before discovered, then by id."""
        require = _requirements(require)
        needs = f" with {', '.join(require)}" if require else ""
        target = self._aliases.get(name_or_role, name_or_role)
        if target in self._records or not name_or_role.startswith(ROLE_PREFIX):
            record = self.resolve(name_or_role)
            if why := self._why_not(record, require):
                raise NoModelQualifies(name_or_role + needs, f"`{record.id}` {why}", [Rejection(record.id, why)])
            named = "" if record.id == name_or_role else f" (`{name_or_role}` names it)"
            return Selection(record, f"`{record.id}` was asked for by name{named}"
                             + (f" and has {', '.join(require)}" if require else ""))
        role = name_or_role.removeprefix(ROLE_PREFIX)
        rejected: list[Rejection] = []
        for record in self.candidates(role):
            if why := self._why_not(record, require):
                rejected.append(Rejection(record.id, why))
                continue
            return Selection(record, self._why_chosen(record, role, require, rejected), rejected)
        detail = "; ".join(f"`{r.id}` {r.reason}" for r in rejected) or f"no model has role `{role}`"
        raise NoModelQualifies(name_or_role + needs, detail, rejected)

    def candidates(self, role: str) -> list[ModelRecord]:
        """The usable models having `role`, in the order `role:<role>` tries them."""
        return sorted((r for r in self.usable() if role in r.manifest.roles), key=self._preference)

    def default_id(self) -> str:
        return self._aliases.get(self.default_model, self.default_model)

    def _preference(self, record: ModelRecord) -> tuple:
        return record.id != self.default_id(), -ORIGIN_RANK[record.origin], record.id

    def _why_chosen(self, record: ModelRecord, role: str, require: list[str], rejected: list[Rejection]) -> str:
        if record.id == self.default_id():
            reason = f"`{record.id}` is the default model and has role `{role}`"
        else:
            reason = (f"`{record.id}` is the first {record.origin} model with role `{role}` "
                      "(default first, then curated, built-in, discovered; then by id)")
        if require:
            reason += f" and has {', '.join(require)}"
        return reason + (f"; {len(rejected)} candidate(s) passed over" if rejected else "")

    def _why_not(self, record: ModelRecord, require: list[str]) -> str | None:
        """Why a record cannot serve a request needing `require`, or None when it can."""
        caps = record.manifest.capabilities
        if missing := [c for c in require if c not in caps]:
            return f"lacks {', '.join(missing)} (capabilities: {', '.join(caps) or 'none'})"
        try:
            path = record.local_path()
        except EngineError as exc:
            return exc.message
        if path is not None and not path.exists():
            return f"has no files at {path}"
        return self._integrity_problem(record.id)

    def _integrity_problem(self, model_id: str) -> str | None:
        """From the recorded state only (no hashing here): a locked model whose last verification
        did not match its expected hash cannot be chosen."""
        try:
            row = self.state.get(model_id) if self.state is not None else None
        except (sqlite3.Error, OSError) as exc:
            log.warning("registry state unreadable (%s); skipping the lock check of %s", exc, model_id)
            return None
        if row and row.locked and row.sha256 and row.expected_sha256 and row.sha256 != row.expected_sha256:
            return f"is locked to sha256 {row.expected_sha256[:12]}… but last verified as {row.sha256[:12]}…"
        return None

    def check_integrity(self, record: ModelRecord) -> None:
        """Before a load: re-hash a locked model's files; raises ModelHashMismatch (409) if they
        changed. Hashing reads every byte: call it off the event loop. No-op without a lab_dir."""
        if self.integrity is not None and (path := record.local_path()) is not None:
            self.integrity.check(record.id, path)

    def record_use(self, model_id: str) -> None:
        self._record(lambda state: state.record_use(model_id, time.time()))

    def record_load(self, model_id: str, seconds: float) -> None:
        self._record(lambda state: state.record_load(model_id, seconds))

    def _record(self, write) -> None:
        # Bookkeeping must never fail a request: a locked or full disk only costs a warning.
        try:
            if self.state is not None:
                write(self.state)
        except (sqlite3.Error, OSError) as exc:
            log.warning("registry state not updated: %s", exc)

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
        root, folder = self.models_dir.resolve(), path.parent.resolve()
        if folder.parent != root or folder.name != manifest.id:  # a symlinked folder, a Windows drive in the id
            raise InvalidRequestError(f"`{manifest.id}` would be written outside the models folder: "
                                      "choose another id.", param="id")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_bytes(msgspec.json.format(msgspec.json.encode(manifest)))
        tmp.replace(path)  # atomic: a crash never leaves half a manifest
        self.scan()
        return self.get(manifest.id)
