"""`omniloader models ...`: list, select, verify, lock/unlock and show models offline, straight from
the models folder and the lab folder's registry state; no running server needed."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import msgspec.yaml

from adapters.errors import EngineError
from adapters.gguf import read_gguf_header
from server.cli.export_onnx import add_export_arguments, export_command
from server.cli.load import add_load_command
from server.errors import InvalidRequestError, NoModelQualifies, OpenAIError
from server.protocol.cli import GGUFInfo, ModelListing
from server.protocol.integrity import ModelState
from server.registry import ModelRecord, Registry, model_files
from server.settings import load_settings

__all__ = ["add_models_parser", "gguf_info"]

EXIT_ERROR = 1
EXIT_HASH_MISMATCH = 2


def add_models_parser(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--models-dir", help="folder of model manifests and weights (default models)")
    common.add_argument("--lab-dir", help="holds registry.sqlite3: hashes, locks, usage (default lab)")
    common.add_argument("--default-model", help="model id that `default` resolves to")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    models = commands.add_parser("models", help="list, select, verify, lock, inspect (offline) and load models")
    sub = models.add_subparsers(dest="models_command", required=True)
    cmd = sub.add_parser("list", parents=[common], help="every model, with its state")
    cmd.add_argument("--role", help="only models with this role, in the order `role:ROLE` tries them")
    cmd.set_defaults(run=_run(_list))
    cmd = sub.add_parser("select", parents=[common], help="which model NAME or role:ROLE picks, and why")
    cmd.add_argument("name", help="an id, alias, `default` or `role:<role>`")
    cmd.add_argument("--require", action="extend", nargs="+", default=[], metavar="CAP",
                     help="capabilities the model must have (tools, json_schema, ...; commas work too)")
    cmd.set_defaults(run=_run(_select))
    cmd = sub.add_parser("verify", parents=[common], help="hash the model's files and record it (exit 2: "
                         "locked and changed)")
    cmd.add_argument("id")
    cmd.set_defaults(run=_run(_verify))
    cmd = sub.add_parser("lock", parents=[common], help="refuse to load the model if its files change")
    cmd.add_argument("id")
    cmd.add_argument("--set-expected", action="store_true", help="pin the hash computed now (re-pin)")
    cmd.set_defaults(run=_run(_lock))
    cmd = sub.add_parser("unlock", parents=[common], help="allow loading whatever the files hold")
    cmd.add_argument("id")
    cmd.set_defaults(run=_run(_unlock))
    cmd = sub.add_parser("show", parents=[common], help="manifest and file metadata (no weights loaded)")
    cmd.add_argument("id")
    cmd.set_defaults(run=_run(_show))
    cmd = sub.add_parser("export-onnx", parents=[common], help="convert an HF folder or GGUF model to an ONNX "
                         "folder with a KV cache (onnx_runtime backend)")
    add_export_arguments(cmd)
    cmd.set_defaults(run=_run(export_command))
    add_load_command(sub)


def _run(command):
    """Open the registry from settings, run the command, turn typed errors into exit codes."""
    def run(args: argparse.Namespace) -> int:
        logging.basicConfig(level=logging.WARNING, format="omniloader: %(levelname)s %(message)s")
        settings = load_settings({"models_dir": args.models_dir, "lab_dir": args.lab_dir,
                                  "default_model": args.default_model})
        registry = Registry(Path(settings.models_dir), settings.default_model, lab_dir=Path(settings.lab_dir))
        registry.scan()
        try:
            return command(registry, args)
        except (OpenAIError, EngineError) as exc:
            print(f"omniloader: {exc.message}", file=sys.stderr)
            return EXIT_ERROR
        finally:
            registry.state.close()
    return run


def _emit(args: argparse.Namespace, value: Any, text: str) -> None:
    print(msgspec.json.format(msgspec.json.encode(value)).decode() if args.json else text)


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else "never"


def _listing(registry: Registry, record: ModelRecord, state: ModelState | None) -> ModelListing:
    m = record.manifest
    listing = ModelListing(id=record.id, origin=record.origin, default=record.id == registry.default_id(),
                           manifest_path=record.manifest_path, error=record.error, state=state)
    if m is not None:
        listing.backend, listing.source, listing.aliases = m.backend, m.source, m.aliases
        listing.roles, listing.capabilities, listing.context_length = m.roles, m.capabilities, m.context_length
    return listing


def _list(registry: Registry, args: argparse.Namespace) -> int:
    records = registry.candidates(args.role) if args.role else registry.records()
    states = registry.state.all()
    rows = [_listing(registry, r, states.get(r.id)) for r in records]
    lines = [f"{'ID':32} {'ORIGIN':10} {'BACKEND':15} {'ROLES':12} {'LOCK':6} {'USES':>5}  CAPABILITIES"]
    for row in rows:
        name = row.id + (" *" if row.default else "")
        if row.error:
            lines.append(f"{name:32} {row.origin:10} invalid: {row.error}")
            continue
        lock = "yes" if row.state and row.state.locked else "-"
        uses = row.state.use_count if row.state else 0
        lines.append(f"{name:32} {row.origin:10} {row.backend:15} {','.join(row.roles):12} {lock:6} {uses:>5}  "
                     f"{','.join(row.capabilities)}")
    _emit(args, rows, "\n".join(lines) + "\n(* = the default model)")
    return 0


def _select(registry: Registry, args: argparse.Namespace) -> int:
    try:
        selection = registry.select(args.name, args.require)
    except NoModelQualifies as exc:
        print(f"omniloader: {exc.message}", file=sys.stderr)
        for r in exc.rejected:
            print(f"  rejected {r.id}: {r.reason}", file=sys.stderr)
        return EXIT_ERROR
    result = selection.result()
    text = [f"model: {result.model}", f"reason: {result.reason}"]
    text += [f"rejected {r.id}: {r.reason}" for r in result.rejected]
    _emit(args, result, "\n".join(text))
    return 0


def _local_path(record: ModelRecord) -> Path:
    path = record.local_path()
    if path is None:
        raise InvalidRequestError(f"Model `{record.id}` is served from `{record.manifest.source}`: no local files.")
    return path


def _verify(registry: Registry, args: argparse.Namespace) -> int:
    record = registry.resolve(args.id)
    result = registry.integrity.verify(record.id, _local_path(record))
    size = sum(f.size for f in result.files)
    text = [f"{result.sha256}  {record.id}",
            f"{len(result.files)} file(s), {size} bytes, verified at {_when(result.verified_at)}"]
    text += [f"  {f.sha256}  {f.path}" for f in result.files]
    if result.locked:
        text.append(f"locked to {result.expected_sha256}: {'OK' if result.ok else 'MISMATCH'}")
    _emit(args, result, "\n".join(text))
    if not result.ok:
        print(f"omniloader: `{record.id}` is locked to sha256 {result.expected_sha256} but its files hash to "
              f"{result.sha256}; the server will refuse to load it.", file=sys.stderr)
        return EXIT_HASH_MISMATCH
    return 0


def _lock(registry: Registry, args: argparse.Namespace) -> int:
    record = registry.resolve(args.id)
    state = registry.integrity.lock(record.id, _local_path(record), set_expected=args.set_expected)
    _emit(args, state, f"locked {record.id} to sha256 {state.expected_sha256}")
    return 0


def _unlock(registry: Registry, args: argparse.Namespace) -> int:
    record = registry.resolve(args.id)
    state = registry.integrity.unlock(record.id)
    _emit(args, state, f"unlocked {record.id}" + (f" (expected sha256 {state.expected_sha256} kept for a "
                                                  "later `lock`)" if state.expected_sha256 else ""))
    return 0


def _show(registry: Registry, args: argparse.Namespace) -> int:
    record = registry.resolve(args.id)
    path = record.local_path()
    info: dict[str, Any] = {"id": record.id, "origin": record.origin, "manifest_path": record.manifest_path,
                            "path": str(path) if path else None, "manifest": record.manifest}
    if path is not None and path.is_file() and path.suffix == ".gguf":
        info["gguf"] = gguf_info(path)
    elif path is not None and path.is_dir():
        info["folder"] = _folder_info(path)
    text = msgspec.yaml.encode(msgspec.to_builtins(info)).decode()
    _emit(args, info, text.rstrip())
    return 0


def _folder_info(path: Path) -> dict[str, Any]:
    """An HF/ONNX folder: config.json highlights and its files (nothing is loaded)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    files = model_files(path)
    keys = ("architectures", "model_type", "max_position_embeddings", "torch_dtype", "vocab_size")
    return {"config": {k: config[k] for k in keys if k in config}, "file_count": len(files),
            "total_size": sum(p.stat().st_size for _, p in files)}


def gguf_info(path: Path) -> GGUFInfo:
    """The header of a GGUF file (tensors are never read)."""
    import gguf

    header = read_gguf_header(path)
    meta = header.metadata
    arch = meta.get("general.architecture")
    file_type = meta.get("general.file_type")
    try:
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quant = f"file_type {file_type}"
    return GGUFInfo(architecture=arch, context_length=meta.get(f"{arch}.context_length") if arch else None,
                    quantization=quant, chat_template="tokenizer.chat_template" in meta,
                    tensor_count=header.tensor_count, file_size=path.stat().st_size)
