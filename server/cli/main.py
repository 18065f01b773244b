"""The `omniloader` command line: one parser, a subcommand per module of server/cli/."""
from __future__ import annotations

import argparse

from server.cli.auras import add_auras_parser
from server.cli.lab import add_lab_parser
from server.cli.models import add_models_parser
from server.cli.serve import add_serve_parser
from server.cli.skillpacks import add_skillpacks_parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omniloader", description="Local OpenAI-compatible inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(commands)
    add_models_parser(commands)
    add_lab_parser(commands)
    add_auras_parser(commands)
    add_skillpacks_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `lab run KIND KEY=VALUE... --model M`: argparse leaves KEY=VALUE after an option unparsed
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "fields", None) is None:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.fields = [*args.fields, *extra]
    return args.run(args)
