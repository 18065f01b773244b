"""`omniloader auras list|show|delete`: the stored auras, offline, straight from the Lab folder (no
running server needed; a running server sees the change at its next request)."""
from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import msgspec.yaml

from server.errors import OpenAIError
from server.lab.auras import AuraStore
from server.lab.service import AURAS_DIR
from server.protocol.auras import AuraObject
from server.settings import load_settings

__all__ = ["add_auras_parser"]

EXIT_ERROR = 1
EXIT_HASH_MISMATCH = 2


def add_auras_parser(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--lab-dir", help="the Lab folder; auras live in <lab dir>/auras (default lab)")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    auras = commands.add_parser("auras", help="list, show and delete the Lab's auras (offline)")
    sub = auras.add_subparsers(dest="auras_command", required=True)
    cmd = sub.add_parser("list", parents=[common], help="every stored aura: base model, components, last change")
    cmd.set_defaults(run=_run(_list))
    cmd = sub.add_parser("show", parents=[common], help="an aura's components and history, its files' hashes checked "
                         "(exit 2: a file changed)")
    cmd.add_argument("name")
    cmd.set_defaults(run=_run(_show))
    cmd = sub.add_parser("delete", parents=[common], help="delete an aura and its files")
    cmd.add_argument("name")
    cmd.set_defaults(run=_run(_delete))


def _run(command):
    def run(args: argparse.Namespace) -> int:
        settings = load_settings({"lab_dir": args.lab_dir})
        store = AuraStore(Path(settings.lab_dir) / AURAS_DIR)
        try:
            return command(store, args)
        except OpenAIError as exc:
            print(f"omniloader: {exc.message}", file=sys.stderr)
            return EXIT_HASH_MISMATCH if exc.code == "aura_hash_mismatch" else EXIT_ERROR
    return run


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _kinds(aura) -> str:
    counts: dict[str, int] = {}
    for c in aura.components:
        counts[c.kind] = counts.get(c.kind, 0) + 1
    return ",".join(f"{k}×{n}" if n > 1 else k for k, n in counts.items()) or "-"


def _list(store: AuraStore, args: argparse.Namespace) -> int:
    auras = [AuraObject.of(a) for a in store.list()]
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(auras)).decode())
        return 0
    lines = [f"{'NAME':24} {'BASE':28} {'UPDATED':26} COMPONENTS"]
    lines += [f"{a.name:24} {a.base:28} {_when(a.updated_at):26} {_kinds(a)}" for a in auras]
    print("\n".join(lines) + f"\n({len(auras)} aura(s) in {store.root}; request one as `model: <base>+<name>`)")
    return 0


def _show(store: AuraStore, args: argparse.Namespace) -> int:
    aura = store.get(args.name)
    info = msgspec.to_builtins(AuraObject.of(aura))
    info["folder"] = str(store.root / aura.name)
    store.check_files(aura)  # 409 (exit 2) when a component file changed
    info["files_verified"] = True
    print(msgspec.json.format(msgspec.json.encode(info)).decode() if args.json
          else msgspec.yaml.encode(info).decode().rstrip())
    return 0


def _delete(store: AuraStore, args: argparse.Namespace) -> int:
    aura = store.delete(args.name)
    print(f"deleted aura {aura.name} ({len(aura.components)} component(s), made on {aura.base})")
    return 0
