"""`omniloader lab ...`: start Lab jobs on a running server and follow them with a progress bar."""
from __future__ import annotations

import argparse
import json
import os
import sys

import msgspec

from server.cli.load import progress_bar

__all__ = ["add_lab_parser"]

ROUTES = {"diagnostics": "/lab/diagnostics/run", "trace": "/lab/trace", "causal_test": "/lab/causal_test",
          "snapshot": "/lab/snapshot", "rollback": "/lab/rollback"}


def add_lab_parser(commands: argparse._SubParsersAction) -> None:
    lab = commands.add_parser("lab", help="Lab jobs on a running server (diagnostics, trace, causal tests, ...)")
    lab.add_argument("--url", default=os.environ.get("OMNILOADER_URL", "http://127.0.0.1:8000"),
                     help="the server (default http://127.0.0.1:8000, env OMNILOADER_URL)")
    lab.add_argument("--api-key", default=os.environ.get("OMNILOADER_API_KEY"), help="the server's API key")
    sub = lab.add_subparsers(dest="lab_command", required=True)
    run = sub.add_parser("run", help="start a job and follow it: omniloader lab run trace --model default "
                                     "prompt='The capital of France is'")
    run.add_argument("kind", choices=sorted(ROUTES))
    run.add_argument("--model", default="default")
    run.add_argument("fields", nargs="*", metavar="KEY=VALUE",
                     help="spec fields; VALUE is parsed as JSON when it can be (n_steps=64, layers=[0,1])")
    run.add_argument("--no-wait", action="store_true", help="print the queued job and return")
    run.set_defaults(run=_run)
    watch = sub.add_parser("watch", help="follow a job's progress until it ends")
    watch.add_argument("job")
    watch.set_defaults(run=_watch)
    jobs = sub.add_parser("jobs", help="list recent jobs")
    jobs.add_argument("--status")
    jobs.add_argument("--kind")
    jobs.set_defaults(run=_jobs)
    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job")
    cancel.set_defaults(run=_cancel)


def _client(args: argparse.Namespace):
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=None)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _fail(response) -> int:
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}"
    print(f"omniloader: {message}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace) -> int:
    body = {"model": args.model}
    for field in args.fields:
        key, sep, value = field.partition("=")
        if not sep:
            print(f"omniloader: `{field}` is not KEY=VALUE", file=sys.stderr)
            return 2
        body[key] = _value(value)
    with _client(args) as client:
        response = client.post(ROUTES[args.kind], json=body)
        if response.status_code != 202:
            return _fail(response)
        job = response.json()
        if args.no_wait:
            print(json.dumps(job, indent=1))
            return 0
        print(f"{job['kind']} {job['id']} on {job['model']}", file=sys.stderr)
        return _follow(client, job["id"])


def _follow(client, job_id: str) -> int:
    """Draws the job's SSE progress, then prints the final job (result and artifact URLs) as JSON."""
    final = None
    with client.stream("GET", f"/lab/jobs/{job_id}/events") as response:
        if response.status_code != 200:
            return _fail(response)
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = msgspec.json.decode(line[6:])
            label = f"{event['kind']} {event['status']}"
            sys.stderr.write(progress_bar(label, event["progress"], event.get("elapsed", 0.0)) +
                             f" {event['message'][:40]:40}")
            sys.stderr.flush()
            final = event.get("job", final)
    sys.stderr.write("\n")
    if final is None:
        print("omniloader: the event stream ended early", file=sys.stderr)
        return 1
    print(json.dumps(final, indent=1))
    return 0 if final["status"] == "succeeded" else 1


def _watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _follow(client, args.job)


def _jobs(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("status", args.status), ("kind", args.kind)) if v}
    with _client(args) as client:
        response = client.get("/lab/jobs", params=params)
        if response.status_code != 200:
            return _fail(response)
        for job in response.json()["data"]:
            print(f"{job['id']}  {job['kind']:12} {job['model']:24} {job['status']:11} {job['progress'] * 100:5.1f}%")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.delete(f"/lab/jobs/{args.job}")
        if response.status_code != 200:
            return _fail(response)
        print(f"{args.job}: {response.json()['status']}")
    return 0
