"""What the pool holds and hands out: loaded instances, overlays, and leases on them."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from adapters.base import Adapter, GenerateParams
from adapters.worker import ModelWorker
from server.registry import ModelRecord

if TYPE_CHECKING:
    from server.runtime.pool import ModelPool

__all__ = ["SERVE", "LAB", "Instance", "Overlay", "Lease"]

# What an instance is for. Serving instances are shared by requests (one per model, `parallel`
# workers); a Lab copy belongs to one job at a time (hooks and gradients are per-module state).
SERVE = "serve"
LAB = "lab"


@dataclass(eq=False)
class Instance:
    """One loaded model in the pool: its workers (one per parallel slot), purpose and accounting."""

    key: str  # the model id for a serving instance, `lab:<id>:<n>` for a Lab copy
    record: ModelRecord
    purpose: str
    workers: list[ModelWorker]
    estimate: int
    keep_alive: float
    last_used: float
    measured: int = 0
    active: int = 0
    waiting: int = 0
    expires_at: float | None = None  # set while idle; None while busy or kept forever
    unload_when_idle: bool = False
    free: asyncio.Queue = field(default_factory=asyncio.Queue)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def model_id(self) -> str:
        return self.record.id

    @property
    def memory(self) -> int:
        return max(self.estimate, self.measured)

    @property
    def busy(self) -> bool:
        return self.active > 0 or self.waiting > 0

    @property
    def adapter(self) -> Adapter:
        return self.workers[0].adapter


class Overlay:
    """Something applied per request on top of a loaded instance without reloading it: an aura's
    prompt delta, token bias, LoRA or steering vector. `adjust` rewrites the request's params; the
    instance's weights are the base's own for every request that carries no overlay."""

    name: str = ""

    def adjust(self, params: GenerateParams) -> GenerateParams:
        return params


class Lease:
    """One holder's claim on one worker of an instance, plus the overlay its requests carry.
    Quacks like the worker (adapter, stream, call); release() gives the slot back (from any thread)."""

    def __init__(self, pool: ModelPool, instance: Instance, worker: ModelWorker, overlay: Overlay | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._pool, self.instance, self.worker, self.overlay = pool, instance, worker, overlay
        self._loop = loop
        self.adapter = worker.adapter
        self.stream = worker.stream
        self.call = worker.call
        self._released = False
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.instance.model_id

    @property
    def name(self) -> str:
        """What clients call this lease's model: `base` or `base+overlay`."""
        return f"{self.model_id}+{self.overlay.name}" if self.overlay is not None else self.model_id

    @property
    def defaults(self) -> dict:
        return self.instance.record.manifest.defaults

    def params(self, params: GenerateParams) -> GenerateParams:
        """The request's params with this lease's overlay applied."""
        return params if self.overlay is None else self.overlay.adjust(params)

    def observe_generation(self, prompt_tokens: int, completion_tokens: int, ttft: float, total: float) -> None:
        self._pool.metrics.generation(self.model_id, prompt_tokens, completion_tokens, ttft, total)

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        on_loop = _running_loop() is self._loop
        if self._loop is None or on_loop:
            self._pool._release(self.instance, self.worker)
        else:  # a Lab job thread gives its copy back: the pool's state lives on the event loop
            try:
                self._loop.call_soon_threadsafe(self._pool._release, self.instance, self.worker)
            except RuntimeError:  # the loop is closed (shutdown): the pool is gone with it
                pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


ProgressFn = Callable[[float], None]
