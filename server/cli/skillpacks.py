"""`omniloader skillpacks export|import`: an aura as one portable zip, offline, straight from the Lab
folder; import verifies every hash and the base model (on --models-dir) before writing anything."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adapters.errors import EngineError
from server.controllers.skillpacks import SKILLPACKS_DIR
from server.errors import OpenAIError
from server.lab.auras import AuraStore
from server.lab.job_store import JobStore
from server.lab.service import AURAS_DIR
from server.lab.skillpacks import export_skillpack, import_skillpack
from server.registry import Registry
from server.settings import load_settings

__all__ = ["add_skillpacks_parser"]

EXIT_ERROR = 1


def add_skillpacks_parser(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--lab-dir", help="the Lab folder (default lab)")
    common.add_argument("--models-dir", help="where the base models are (default models)")
    packs = commands.add_parser("skillpacks", help="export an aura as a skillpack zip, or import one (offline)")
    sub = packs.add_subparsers(dest="skillpacks_command", required=True)
    cmd = sub.add_parser("export", parents=[common], help="write <lab dir>/skillpacks/<aura>-<time>.zip (or --out)")
    cmd.add_argument("aura")
    cmd.add_argument("--out", help="a folder to write the zip to")
    cmd.set_defaults(run=_run(_export))
    cmd = sub.add_parser("import", parents=[common], help="verify a skillpack and add its aura")
    cmd.add_argument("file")
    cmd.add_argument("--name", help="import the aura under this name")
    cmd.set_defaults(run=_run(_import))


def _run(command):
    def run(args: argparse.Namespace) -> int:
        settings = load_settings({"lab_dir": args.lab_dir, "models_dir": args.models_dir})
        try:
            return command(Path(settings.lab_dir), Path(settings.models_dir), settings, args)
        except (OpenAIError, EngineError) as exc:
            print(f"omniloader: {exc.message}", file=sys.stderr)
            return EXIT_ERROR
    return run


def _export(lab_dir: Path, _models_dir: Path, _settings, args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else lab_dir / SKILLPACKS_DIR
    path, manifest = export_skillpack(AuraStore(lab_dir / AURAS_DIR), JobStore(lab_dir / "jobs.sqlite3"), args.aura,
                                      out)
    print(f"{path}\n{len(manifest['files'])} files, made on {manifest['base']['id']}")
    return 0


def _import(lab_dir: Path, models_dir: Path, settings, args: argparse.Namespace) -> int:
    registry = Registry(models_dir, settings.default_model, lab_dir=lab_dir)
    registry.scan()
    aura = import_skillpack(AuraStore(lab_dir / AURAS_DIR), registry, Path(args.file).read_bytes(), args.name)
    print(f"imported aura {aura.name} ({len(aura.components)} component(s)); request it as `model: "
          f"{aura.base}+{aura.name}`")
    return 0
