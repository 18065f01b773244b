"""The Lab's own torch copies of models.

The Lab never works on the instance that serves chat: a job checks out a copy loaded through the
hf_transformers adapter (a GGUF such as the default is dequantized into torch by transformers), so
chat requests to the same model keep being answered while a job runs, and hooks or gradients never
touch a live generation. A copy serves one job at a time (hooks are per-module state), and idle
copies are kept for the next job up to `max_copies`, oldest dropped first.

Copies count against the router's memory budget (RouterBudget): loading one evicts idle served
models as loading a served model would, and a served model that needs room frees idle copies."""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from server.errors import CapabilityNotSupported
from server.registry import ModelRecord, Registry

__all__ = ["LabCopy", "LabModels", "MemoryBudget", "RouterBudget", "lab_record"]

TORCH_BACKENDS = ("hf_transformers", "llama_cpp")


def lab_record(record: ModelRecord) -> ModelRecord:
    """The record the Lab loads for a served model: itself for hf_transformers, the same GGUF through
    transformers for llama_cpp; other backends have no torch weights to look into."""
    manifest = record.manifest
    if manifest is None or manifest.backend not in TORCH_BACKENDS:
        backend = manifest.backend if manifest else "none"
        raise CapabilityNotSupported(
            f"Model `{record.id}` (backend {backend}) has no torch weights the Lab can work on: the Lab needs an "
            f"hf_transformers or GGUF (llama_cpp) model.", param="model")
    if manifest.backend == "hf_transformers":
        return record
    lab_manifest = msgspec.structs.replace(manifest, backend="hf_transformers", params={})
    return msgspec.structs.replace(record, manifest=lab_manifest)


class MemoryBudget(Protocol):
    def reserve(self, key: str, nbytes: int, what: str) -> None:
        """Blocks until nbytes fit (or raises InsufficientMemory)."""

    def release(self, key: str) -> None: ...


class RouterBudget:
    """The router's memory budget, used from the Lab's job threads (the router lives on the event loop)."""

    def __init__(self, router) -> None:
        self.router = router
        self.loop: asyncio.AbstractEventLoop | None = None  # bound at app start-up

    def reserve(self, key: str, nbytes: int, what: str) -> None:
        asyncio.run_coroutine_threadsafe(self.router.reserve(key, nbytes, what), self.loop).result()

    def release(self, key: str) -> None:
        self.router.release(key)


@dataclass
class LabCopy:
    model_id: str
    adapter: object  # adapters.hf_transformers.HFTransformersAdapter, loaded
    view: object  # lab_engines.model_access.ModelView
    key: str  # its reservation in the memory budget
    memory: int  # bytes reserved (the adapter's estimate)
    last_used: float = field(default_factory=time.monotonic)


class LabModels:
    def __init__(self, registry: Registry, adapter_factory: Callable[[ModelRecord], object], max_copies: int = 1,
                 budget: MemoryBudget | None = None):
        self.registry = registry
        self._factory = adapter_factory
        self.max_copies = max(1, max_copies)
        self._budget = budget
        self._serial = itertools.count(1)
        self._idle: list[LabCopy] = []
        self._busy: list[LabCopy] = []
        self._lock = threading.Lock()

    def checkout(self, model_id: str, progress: Callable[[float], None] | None = None) -> LabCopy:
        """An idle copy of model_id, or a freshly loaded one (blocking: call from a job thread)."""
        with self._lock:
            copy = next((c for c in self._idle if c.model_id == model_id), None)
            if copy is not None:
                self._idle.remove(copy)
                self._busy.append(copy)
                return copy
            victims = self._over_limit(extra=1)  # room for the copy about to load, before it loads
        self._drop(victims)
        copy = self._load(model_id, progress)
        with self._lock:
            self._busy.append(copy)
        return copy

    def checkin(self, copy: LabCopy) -> None:
        with self._lock:
            if copy in self._busy:
                self._busy.remove(copy)
            copy.last_used = time.monotonic()
            self._idle.append(copy)
            victims = self._over_limit()
        self._drop(victims)

    def reclaim_idle(self) -> bool:
        """Unload the least recently used idle copy (the router calls this when a load needs room)."""
        with self._lock:
            if not self._idle:
                return False
            self._idle.sort(key=lambda c: c.last_used)
            victim = self._idle.pop(0)
        self._drop([victim])
        return True

    def copies(self) -> list[dict]:
        """What GET /lab/models lists: each loaded copy, busy (a job has it) or idle."""
        with self._lock:
            listed = [(c, "busy") for c in self._busy] + [(c, "idle") for c in self._idle]
        return [{"model": c.model_id, "state": state, "memory_bytes": c.memory,
                 "idle_s": round(time.monotonic() - c.last_used, 1) if state == "idle" else 0.0}
                for c, state in listed]

    def close(self) -> None:
        with self._lock:
            copies, self._idle = self._idle, []
        self._drop(copies)

    def _load(self, model_id: str, progress: Callable[[float], None] | None) -> LabCopy:
        from lab_engines.model_access import ModelView

        record = lab_record(self.registry.get(model_id))
        adapter = self._factory(record)
        key, memory = f"lab:{model_id}:{next(self._serial)}", adapter.memory_estimate()
        if self._budget is not None:
            self._budget.reserve(key, memory, f"The Lab's copy of `{model_id}`")
        try:
            adapter.load(progress)
            handle = adapter.torch_handle()
            if not handle.causal:
                raise CapabilityNotSupported(f"Model `{model_id}` is not a decoder (causal LM): the Lab's engines "
                                             f"need one.", param="model")
            return LabCopy(model_id, adapter, ModelView(handle.model, handle.tokenizer), key, memory)
        except BaseException:
            adapter.unload()
            if self._budget is not None:
                self._budget.release(key)
            raise

    def _over_limit(self, extra: int = 0) -> list[LabCopy]:
        """Take the least recently used idle copies beyond max_copies (busy ones stay); call with the lock held."""
        self._idle.sort(key=lambda c: c.last_used)
        victims = []
        while self._idle and len(self._idle) + len(self._busy) + extra > self.max_copies:
            victims.append(self._idle.pop(0))
        return victims

    def _drop(self, copies: list[LabCopy]) -> None:
        for copy in copies:
            copy.adapter.unload()
            if self._budget is not None:
                self._budget.release(copy.key)
