"""The Victor contract: a user's own runner.py, served from its own worker process.

Manifest: `backend: victor_custom`, `source` = the folder holding runner.py (+ config.yaml,
weights/, tokenizer/), `params`: `timeout` (seconds the runner may stay silent during a request;
default 60), `load_timeout` (for init(); default 120), `max_memory` (an address-space limit for
the process, e.g. "2G"), `memory_estimate` (what the router books for it; default the weights'
size + 256 MiB). Capabilities: what the manifest declares of chat and completion (default chat).
A crash, hang or memory blow-up in user code fails that one request (500 / 504) and the process
is restarted; the server keeps serving. See victor/README.md for the runner.py contract."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from adapters.base import Adapter, Capability, Delta, GenerateParams, Usage
from adapters.errors import HINT_MODEL, HINT_SUFFIX, BackendTimedOut, LoadFailed, RunnerFailed, Unsupported
from adapters.overlay import refuse_overlay
from adapters.process_worker import LAB_FUNCTIONS, RunnerFailure, RunnerProcess
from adapters.text import StopBuffer
from adapters.machine import parse_size

__all__ = ["VictorCustomAdapter"]

log = logging.getLogger("omniloader.victor_custom")

DEFAULT_TIMEOUT = 60.0
DEFAULT_LOAD_TIMEOUT = 120.0
RUNTIME_OVERHEAD = 256 << 20  # an interpreter with torch imported, before any weights
SUPPORTED = frozenset({Capability.CHAT, Capability.COMPLETION})


class VictorCustomAdapter(Adapter):
    backend = "victor_custom"
    supported = SUPPORTED

    @classmethod
    def probe_capabilities(cls, record) -> frozenset[str]:
        return frozenset({Capability.CHAT})  # a runner.py chats; completion only when its manifest says so

    def __init__(self, record, settings=None) -> None:
        super().__init__(record, settings)
        params = self.manifest.params
        self.folder = record.source_path()
        self.timeout = float(params.get("timeout", DEFAULT_TIMEOUT))
        self.load_timeout = float(params.get("load_timeout", DEFAULT_LOAD_TIMEOUT))
        self.max_memory = parse_size(params["max_memory"]) if params.get("max_memory") else None
        self.capabilities = frozenset(set(self.manifest.capabilities or {Capability.CHAT}) & SUPPORTED)
        self.runner = RunnerProcess(self.folder, timeout=self.timeout, start_timeout=self.load_timeout,
                                    max_memory=self.max_memory)

    # --- lifecycle -------------------------------------------------------------------------
    def load(self, progress: Callable[[float], None] | None = None) -> None:
        if not (self.folder / "runner.py").is_file():
            raise LoadFailed(f"Model `{self.id}`: no runner.py in {self.folder}.")
        try:
            self.runner.start()
            self.runner.wait_ready()
        except RunnerFailure as failure:
            self.runner.kill()
            raise LoadFailed(f"Model `{self.id}`: runner.py failed to start: {failure.message}") from None
        if progress is not None:
            progress(1.0)

    def unload(self) -> None:
        self.runner.stop()

    def memory_estimate(self) -> int:
        if estimate := self.manifest.params.get("memory_estimate"):
            return parse_size(estimate)
        weights = self.folder / "weights"
        size = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) if weights.is_dir() else 0
        return size + RUNTIME_OVERHEAD

    def context_length(self) -> int:
        if self.manifest.context_length:
            return self.manifest.context_length
        return super().context_length()

    # --- generation ------------------------------------------------------------------------
    def generate(self, params: GenerateParams, cancel: threading.Event) -> Iterator[Delta]:
        refuse_overlay(params.overlay, self.id, self.backend)
        if params.suffix is not None:
            raise Unsupported(f"Model `{self.id}` (backend victor_custom) does not support `suffix`.",
                                         hint=HINT_SUFFIX)
        chat = params.messages is not None
        messages = params.messages if chat else [{"role": "user", "content": params.prompt or ""}]
        request = {"mode": "chat" if chat else "completion", "prompt": params.prompt,
                   "max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
                   "top_k": params.top_k, "seed": params.seed, "stop": list(params.stop)}
        stops, pieces, finish, info, stopped, cut = StopBuffer(params.stop), 0, "stop", {}, False, False
        stream = self.runner.infer(messages, request, cancel)
        try:
            for kind, value in stream:
                if kind != "piece":  # usage so far (a yielded dict) or the end (infer's return value)
                    info.update(value or {})
                    if kind == "end":
                        break
                    continue
                if params.max_tokens is not None and pieces >= params.max_tokens:
                    cut = True  # the runner ignored max_tokens: it is cut off here
                    break
                pieces += 1
                text, stopped = stops.push(value)
                if text:
                    yield Delta(text=text)
                if stopped:
                    break
        except RunnerFailure as failure:
            raise self._failed(failure) from None
        finally:
            stream.close()  # stops the runner if we left early (stop string, max_tokens, client gone)
        if not stopped:
            finish = "length" if cut else (info.get("finish_reason") or finish)
        usage = Usage(int(info.get("prompt_tokens") or 0), int(info.get("completion_tokens") or pieces))
        yield Delta(text="" if stopped else stops.flush(), finish_reason=finish, usage=usage)

    def _failed(self, failure: RunnerFailure) -> Exception:
        """The request's error; a process that died, hung or blew its memory is replaced at once."""
        message = f"Model `{self.id}`: {failure.message}"
        if failure.kind == "memory" and self.max_memory:
            message += f" (params.max_memory is {self.max_memory >> 20} MiB)"
        if failure.kind in ("crashed", "timeout", "memory", "init"):
            log.warning("%s: runner %s: %s; restarting its process", self.id, failure.kind, failure.message)
            self.runner.restart()
            message += "; a fresh runner process is starting"
        if failure.kind == "timeout":
            return BackendTimedOut(message + ".")
        code = {"crashed": "runner_crashed", "memory": "runner_out_of_memory", "init": "runner_init_failed"}
        return RunnerFailed(message + ".", code=code.get(failure.kind, "runner_error"))

    # --- the runner's optional functions (the Lab calls these) -----------------------------
    @property
    def runner_functions(self) -> list[str]:
        """Which of runner.py's optional functions exist (tokenize, trace, diagnostics, ...)."""
        return list(self.runner.functions)

    def call_runner(self, name: str, *args: Any) -> Any:
        """Call runner.<name>(*args) in the runner's process (arguments and result are pickled)."""
        if name not in LAB_FUNCTIONS or name not in self.runner.functions:
            raise Unsupported(f"Model `{self.id}`'s runner.py has no `{name}` function.", hint=HINT_MODEL)
        try:
            return self.runner.call(name, *args)
        except RunnerFailure as failure:
            raise self._failed(failure) from None

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return [int(t) for t in self.call_runner("tokenize", text)]

    def detokenize(self, ids: list[int]) -> str:
        return str(self.call_runner("detokenize", list(ids)))
