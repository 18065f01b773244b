"""ModelRouter: resolves a request's model, keeps models resident under a memory budget, and
hands out leases on a model's workers (parallel slots) with a bounded wait queue.

Memory held outside the router (the Lab's torch copies) counts against the same budget through
reserve()/release(); reclaimers free the idle part of it when a load needs room."""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from adapters.base import Adapter
from adapters.worker import ModelWorker
from server.errors import (
    ClientGone,
    InsufficientMemory,
    ModelLoadError,
    OpenAIError,
    QueueFull,
)
from server.keep_alive import FOREVER, parse_keep_alive
from adapters.machine import process_rss
from server.metrics import Metrics
from server.registry import ModelRecord, Registry

__all__ = ["RouterConfig", "Resident", "Lease", "ModelRouter"]

log = logging.getLogger("omniloader.router")

AdapterFactory = Callable[[ModelRecord], Adapter]


@dataclass
class RouterConfig:
    max_memory: int  # bytes all resident models may take together
    max_loaded: int = 8
    max_queue: int = 32  # requests waiting per model before 503
    keep_alive: float = 300.0  # default idle time before unloading (seconds; inf = forever)


@dataclass(eq=False)
class Resident:
    """A loaded model: its workers (one per parallel slot), accounting and idle timer."""

    record: ModelRecord
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
    def memory(self) -> int:
        return max(self.estimate, self.measured)

    @property
    def busy(self) -> bool:
        return self.active > 0 or self.waiting > 0


class Lease:
    """One request's hold on one worker of a model. Quacks like the worker (adapter, stream,
    call); release() gives the slot back and starts the model's keep-alive timer."""

    def __init__(self, router: ModelRouter, resident: Resident, worker: ModelWorker) -> None:
        self._router, self.resident, self.worker = router, resident, worker
        self.adapter = worker.adapter
        self.stream = worker.stream
        self.call = worker.call
        self._released = False

    @property
    def model_id(self) -> str:
        return self.resident.record.id

    def observe_generation(self, prompt_tokens: int, completion_tokens: int, ttft: float, total: float) -> None:
        self._router.metrics.generation(self.model_id, prompt_tokens, completion_tokens, ttft, total)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._router._release(self.resident, self.worker)


class ModelRouter:
    def __init__(self, registry: Registry, adapter_factory: AdapterFactory, config: RouterConfig, *,
                 clock: Callable[[], float] = time.monotonic, memory_probe: Callable[[], int] = process_rss,
                 metrics: Metrics | None = None) -> None:
        self.registry = registry
        self.config = config
        self.metrics = metrics or Metrics()
        self._factory, self._clock, self._probe = adapter_factory, clock, memory_probe
        self._resident: dict[str, Resident] = {}
        self._loading: set[str] = set()
        self._load_errors: dict[str, str] = {}
        self._load_lock = asyncio.Lock()
        self._reserved: dict[str, int] = {}  # key -> bytes held outside the router
        self._reserved_lock = threading.Lock()  # release() comes from any thread
        self._reclaimers: list[Callable[[], bool]] = []

    # --- state -----------------------------------------------------------------------------
    def state(self, model_id: str) -> str:
        if model_id in self._resident:
            return "loaded"
        if model_id in self._loading:
            return "loading"
        return "failed" if model_id in self._load_errors else "unloaded"

    def load_error(self, model_id: str) -> str | None:
        return self._load_errors.get(model_id)

    def resident(self) -> list[str]:
        return list(self._resident)

    def residents(self) -> list[Resident]:
        return list(self._resident.values())

    def now(self) -> float:
        return self._clock()

    def used_memory(self) -> int:
        # list(): the Lab reads this from its threads while the event loop may change the dict
        return sum(r.memory for r in list(self._resident.values())) + self.reserved_memory()

    def reserved_memory(self) -> int:
        with self._reserved_lock:
            return sum(self._reserved.values())

    # --- memory held outside the router ----------------------------------------------------
    def add_reclaimer(self, reclaim: Callable[[], bool]) -> None:
        """reclaim() frees one idle holder of reserved memory (releasing its reservation) and says whether it
        did; called on the event loop before idle models are evicted."""
        self._reclaimers.append(reclaim)

    async def reserve(self, key: str, nbytes: int, what: str) -> None:
        """Count nbytes under `key` in the budget, evicting idle models first as a load would."""
        if nbytes > self.config.max_memory:
            raise InsufficientMemory(f"{what} needs about {nbytes >> 20} MiB, more than the whole budget of "
                                     f"{self.config.max_memory >> 20} MiB (--max-memory).")
        async with self._load_lock:
            await self._make_room(nbytes, what)
            with self._reserved_lock:
                self._reserved[key] = nbytes
        log.info("reserved %d MiB for %s", nbytes >> 20, what)

    def release(self, key: str) -> None:
        with self._reserved_lock:
            self._reserved.pop(key, None)

    # --- requests --------------------------------------------------------------------------
    async def acquire(self, name: str, *, keep_alive: str | float | None = None,
                      disconnected: Callable[[], Awaitable[None]] | None = None) -> Lease:
        """A lease on the model `name` (id, alias, role or `default`): loads it if needed, then waits
        in FIFO order for a free slot. `disconnected` resolves when the client goes away."""
        record = self.registry.resolve(name)
        requested_keep_alive = parse_keep_alive(keep_alive)
        resident = self._resident.get(record.id) or await self.load(record.id)
        if resident.free.empty() and resident.waiting >= self.config.max_queue:
            raise QueueFull(f"Model `{record.id}` has {resident.waiting} requests waiting; try again shortly.",
                            retry_after=max(1, resident.waiting // max(len(resident.workers), 1)))
        resident.waiting += 1
        self._gauges(resident)
        log.debug("%s: waiting for a slot (%d waiting, %d active)", record.id, resident.waiting, resident.active)
        try:
            worker = await self._take_slot(resident, disconnected)
        finally:
            resident.waiting -= 1
        resident.active += 1
        resident.idle.clear()
        resident.expires_at = None
        resident.last_used = self._clock()
        if requested_keep_alive is not None:
            resident.keep_alive = requested_keep_alive
        self._gauges(resident)
        self.registry.record_use(record.id)
        return Lease(self, resident, worker)

    async def _take_slot(self, resident: Resident, disconnected) -> ModelWorker:
        if disconnected is None or not resident.free.empty():
            return await resident.free.get()
        take = asyncio.ensure_future(resident.free.get())
        gone = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({take, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if take in done:
            return take.result()
        take.cancel()  # leaves the queue; a slot it raced for goes back
        if take.done() and not take.cancelled():
            resident.free.put_nowait(take.result())
        raise ClientGone("The client disconnected while waiting for the model.")

    def _release(self, resident: Resident, worker: ModelWorker) -> None:
        log.debug("%s: slot released (%d waiting, %d active)", resident.record.id, resident.waiting, resident.active - 1)
        resident.active -= 1
        resident.last_used = self._clock()
        resident.free.put_nowait(worker)
        self._gauges(resident)
        if resident.busy:
            return
        resident.idle.set()
        if resident.unload_when_idle or resident.keep_alive == 0:
            self._unload(resident, "keep_alive" if resident.keep_alive == 0 else "evicted")
        elif resident.keep_alive != FOREVER:
            resident.expires_at = resident.last_used + resident.keep_alive

    def reap(self) -> list[str]:
        """Unload idle models whose keep-alive ran out; returns their ids."""
        now = self._clock()
        expired = [r for r in self._resident.values()
                   if not r.busy and r.expires_at is not None and r.expires_at <= now]
        for resident in expired:
            self._unload(resident, "expired")
        return [r.record.id for r in expired]

    async def reaper(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reap()

    # --- loading and unloading -------------------------------------------------------------
    async def load(self, model_id: str, progress: Callable[[float], None] | None = None) -> Resident:
        record = self.registry.get(model_id)
        async with self._load_lock:  # one load at a time; resident models keep serving meanwhile
            if (resident := self._resident.get(model_id)) is not None:
                return resident
            self._loading.add(model_id)
            try:
                resident = await self._load_locked(record, progress)
            except OpenAIError as exc:
                self._load_failed(model_id, exc.message)
                raise
            except Exception as exc:
                log.exception("loading %s failed", model_id)
                self._load_failed(model_id, str(exc))
                raise ModelLoadError(f"Model `{model_id}` failed to load: {exc}") from exc
            finally:
                self._loading.discard(model_id)
            self._load_errors.pop(model_id, None)
            self._resident[model_id] = resident
            self.metrics.loads.labels(model_id, "ok").inc()
            self._gauges(resident)
            return resident

    def _load_failed(self, model_id: str, message: str) -> None:
        self._load_errors[model_id] = message
        self.metrics.loads.labels(model_id, "failed").inc()

    async def _load_locked(self, record: ModelRecord, progress) -> Resident:
        await asyncio.to_thread(self.registry.check_integrity, record)  # hashes every byte of a locked model
        adapters = [self._factory(record) for _ in range(record.manifest.parallel)]
        estimate = sum(a.memory_estimate() for a in adapters)
        if estimate > self.config.max_memory:
            raise InsufficientMemory(f"Model `{record.id}` needs about {estimate >> 20} MiB, more than the whole "
                                     f"budget of {self.config.max_memory >> 20} MiB (--max-memory).")
        await self._make_room(estimate, f"Model `{record.id}`")
        started, before = time.perf_counter(), self._probe()
        workers: list[ModelWorker] = []
        try:
            for i, adapter in enumerate(adapters):
                worker = ModelWorker(adapter)
                workers.append(worker)
                await worker.start(_slot_progress(progress, i, len(adapters)))
        except BaseException:
            for worker in workers:
                worker.stop()
            raise
        seconds = time.perf_counter() - started
        keep_alive = parse_keep_alive(record.manifest.keep_alive, "keep_alive")
        resident = Resident(record, workers, estimate, self.config.keep_alive if keep_alive is None else keep_alive,
                            self._clock(), measured=max(0, self._probe() - before))
        for worker in workers:
            resident.free.put_nowait(worker)
        resident.idle.set()
        if resident.keep_alive != FOREVER:  # loaded but never used: it expires like an idle one
            resident.expires_at = resident.last_used + resident.keep_alive
        self.registry.record_load(record.id, seconds)
        log.info("loaded %s (%s) in %.2fs: estimated %d MiB, measured %d MiB", record.id, record.manifest.backend,
                 seconds, estimate >> 20, resident.measured >> 20)
        return resident

    async def _make_room(self, needed: int, what: str) -> None:
        """Free idle reserved memory, then evict idle models (earliest to expire first: least recently
        used with the shortest keep-alive) until `needed` fits; a busy model is marked and waited for,
        never cut off. Memory that busy reservations hold cannot be waited for: 507."""
        while (short := self.used_memory() + needed > self.config.max_memory) \
                or len(self._resident) >= self.config.max_loaded:
            if short and any(reclaim() for reclaim in self._reclaimers):
                continue
            if not self._resident:
                raise InsufficientMemory(
                    f"{what} needs about {needed >> 20} MiB; running Lab jobs hold {self.reserved_memory() >> 20} "
                    f"MiB of the {self.config.max_memory >> 20} MiB budget (--max-memory). Retry when they finish.")
            idle = [r for r in self._resident.values() if not r.busy]
            if idle:
                self._unload(min(idle, key=self._eviction_order), "evicted")
                continue
            victim = min(self._resident.values(), key=self._eviction_order)
            victim.unload_when_idle = True
            log.info("waiting for %s to finish its requests to make room", victim.record.id)
            await victim.idle.wait()
            if victim.record.id in self._resident and not victim.busy:
                self._unload(victim, "evicted")

    def _eviction_order(self, resident: Resident) -> tuple[float, float]:
        expires = resident.last_used + resident.keep_alive if resident.keep_alive != FOREVER else math.inf
        return expires, resident.last_used

    def _unload(self, resident: Resident, reason: str) -> None:
        model_id = resident.record.id
        if self._resident.get(model_id) is not resident:
            return
        del self._resident[model_id]
        for worker in resident.workers:
            worker.stop()
        self.metrics.evictions.labels(model_id, reason).inc()
        try:
            self.metrics.memory.remove(model_id)
        except KeyError:  # never had a reading
            pass
        self.metrics.resident.set(len(self._resident))
        log.info("unloading %s (%s)", model_id, reason)

    async def unload(self, model_id: str) -> bool:
        """Unload now if idle, else as soon as its last request ends. False if it was not loaded."""
        self.registry.get(model_id)
        resident = self._resident.get(model_id)
        if resident is None:
            return False
        if resident.busy:
            resident.unload_when_idle = True
        else:
            self._unload(resident, "requested")
        return True

    async def close(self) -> None:
        for resident in list(self._resident.values()):
            self._unload(resident, "shutdown")

    # --- helpers ---------------------------------------------------------------------------
    def _gauges(self, resident: Resident) -> None:
        model_id = resident.record.id
        self.metrics.queue_depth.labels(model_id).set(resident.waiting)
        self.metrics.active.labels(model_id).set(resident.active)
        self.metrics.memory.labels(model_id).set(resident.memory)
        self.metrics.resident.set(len(self._resident))


def _slot_progress(progress, slot: int, slots: int):
    if progress is None:
        return None
    return lambda fraction: progress((slot + fraction) / slots)
