"""`omniloader models load ID`: asks a running server to load a model and draws its progress."""
from __future__ import annotations

import argparse
import os
import sys

import msgspec

__all__ = ["add_load_command", "progress_bar"]

BAR_WIDTH = 30


def add_load_command(sub: argparse._SubParsersAction) -> None:
    cmd = sub.add_parser("load", help="load a model on a running server, with a progress bar")
    cmd.add_argument("id", help="model id, alias or role:ROLE")
    cmd.add_argument("--url", default=os.environ.get("OMNILOADER_URL", "http://127.0.0.1:8000"),
                     help="the server (default http://127.0.0.1:8000, env OMNILOADER_URL)")
    cmd.add_argument("--api-key", default=os.environ.get("OMNILOADER_API_KEY"), help="the server's API key")
    cmd.set_defaults(run=_load)


def progress_bar(model: str, fraction: float, seconds: float) -> str:
    filled = int(round(fraction * BAR_WIDTH))
    return f"\r{model} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction * 100:5.1f}% {seconds:5.1f}s"


def _load(args: argparse.Namespace) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    url = f"{args.url.rstrip('/')}/api/models/{args.id}/load"
    try:
        with httpx.stream("POST", url, params={"stream": "true"}, headers=headers, timeout=None) as response:
            if response.status_code != 200:
                error = msgspec.json.decode(response.read()).get("error", {})
                print(f"omniloader: {error.get('message', response.status_code)}", file=sys.stderr)
                return 1
            return _draw(response.iter_lines())
    except httpx.HTTPError as exc:
        print(f"omniloader: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1


def _draw(lines) -> int:
    status = 1
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = msgspec.json.decode(line[6:])
        if "error" in event:
            print(f"\nomniloader: {event['error']['message']}", file=sys.stderr)
            return 1
        sys.stderr.write(progress_bar(event["model"], event["progress"], event["seconds"]))
        sys.stderr.flush()
        if event["status"] == "loaded":
            status = 0
    sys.stderr.write("\n")
    return status
