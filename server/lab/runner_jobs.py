"""Lab jobs on a custom runner (victor_custom): the runner's own Lab functions, called in its
process, instead of the Lab's torch engines (a runner has no torch weights the Lab can load).

| job kind | runner function, called as |
|---|---|
| diagnostics  | `diagnostics()` |
| trace        | `trace(prompt)` |
| causal_test  | `causal_test(spec)` — the request body without `model` |
| train_target | `train_target(examples, settings)` — examples `[{prompt | messages, target, rejected?}]`, settings the rest |

A runner that lacks the function is a 400 naming it; the job's result is what the function returns
(a dict; anything else is wrapped as {"result": ...})."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from server.errors import CapabilityNotSupported, InvalidRequestError
from server.registry import ModelRecord

__all__ = ["RUNNER_KEY", "RUNNER_KINDS", "is_runner_model", "runner_spec", "runner_call", "as_result"]

RUNNER_KEY = "_runner"  # in a job's spec: the runner function to call and its arguments
RUNNER_KINDS = ("diagnostics", "trace", "causal_test", "train_target")
_EXAMPLE_FIELDS = ("prompt", "messages", "target", "rejected")


def is_runner_model(record: ModelRecord) -> bool:
    return record.manifest is not None and record.manifest.backend == "victor_custom"


def _defined_functions(record: ModelRecord) -> set[str]:
    """Top-level functions of the runner's runner.py, read without running it."""
    path = Path(record.source_path()) / "runner.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return set()
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def runner_spec(kind: str, record: ModelRecord, data: dict[str, Any]) -> dict[str, Any]:
    """The job spec for `kind` on a runner model: which function, with which arguments (400 if none)."""
    if kind not in RUNNER_KINDS:
        raise CapabilityNotSupported(f"Model `{record.id}` is a custom runner: the Lab runs {', '.join(RUNNER_KINDS)} "
                                     f"through its runner.py, not `{kind}`.", param="model")
    if kind not in _defined_functions(record):
        raise CapabilityNotSupported(f"Model `{record.id}`'s runner.py has no `{kind}` function, so the Lab cannot "
                                     f"run `{kind}` on it.", param="model")
    return {**data, RUNNER_KEY: {"function": kind, "args": _arguments(kind, data)}}


def _arguments(kind: str, data: dict[str, Any]) -> list[Any]:
    if kind == "diagnostics":
        return []
    if kind == "trace":
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequestError("`prompt` is required: the text to trace.", param="prompt")
        return [prompt]
    if kind == "causal_test":
        return [data]
    target = data.get("target")
    if not isinstance(target, str) or not target:
        raise InvalidRequestError("`target` is required: the answer to teach.", param="target")
    if not isinstance(data.get("prompt"), str) and not isinstance(data.get("messages"), list):
        raise InvalidRequestError("Give `prompt` or `messages`.", param="prompt")
    example = {k: data[k] for k in _EXAMPLE_FIELDS if k in data}
    settings = {k: v for k, v in data.items() if k not in _EXAMPLE_FIELDS}
    return [[example], settings]


def runner_call(spec: dict[str, Any]) -> tuple[str, list[Any]]:
    call = spec[RUNNER_KEY]
    return call["function"], list(call["args"])


def as_result(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"result": value}
