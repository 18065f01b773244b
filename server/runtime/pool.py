"""ModelPool: the one owner of every loaded model instance.

Serving instances (one per model, `parallel` workers, shared by requests through a bounded FIFO
queue) and the Lab's private copies (one job at a time each) live in one ledger, are loaded one at
a time under one load lock (every load is integrity-checked first), and share one memory budget:
a load frees idle Lab copies first, then evicts idle serving instances (earliest to expire first),
and waits for a busy one rather than cut it off. `/api/ps`, `/lab/models` and eviction all read
this ledger. Everything here runs on the event loop; Lab job threads reach it through
checkout_blocking() and give copies back with Lease.release()."""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from adapters.base import Adapter, ordered
from adapters.errors import EngineError
from adapters.machine import process_rss
from adapters.worker import ModelWorker
from server.errors import ClientGone, ModelLoadError, ModelNotFound, OpenAIError, QueueFull, from_engine
from server.keep_alive import FOREVER, parse_keep_alive
from server.metrics import Metrics
from server.registry import ModelRecord, Registry
from server.runtime.instance import LAB, SERVE, Instance, Lease, Overlay, ProgressFn
from server.runtime.room import make_room, too_big

__all__ = ["PoolConfig", "ModelPool", "AdapterFactory", "OverlayResolver"]

log = logging.getLogger("omniloader.pool")

AdapterFactory = Callable[[ModelRecord], Adapter]
# (base record, overlay name) -> Overlay; called on a thread (it may read files). A resolver may also have
# listing() -> [(base model id, overlay name, created)]: /v1/models lists those as `base+name`.
OverlayResolver = Callable[[ModelRecord, str], Overlay]
OVERLAY_SEPARATOR = "+"  # `model: "base+aura"`


@dataclass
class PoolConfig:
    max_memory: int  # bytes every loaded instance may take together
    max_loaded: int = 8  # serving instances at once
    max_queue: int = 32  # requests waiting per model before 503
    keep_alive: float = 300.0  # default idle time before a serving instance unloads (seconds; inf = forever)
    max_copies: int = 1  # Lab copies kept loaded (busy or idle)


class ModelPool:
    def __init__(self, registry: Registry, adapter_factory: AdapterFactory, config: PoolConfig, *,
                 clock: Callable[[], float] = time.monotonic, memory_probe: Callable[[], int] = process_rss,
                 metrics: Metrics | None = None) -> None:
        self.registry = registry
        self.config = config
        self.metrics = metrics or Metrics()
        self.overlays: OverlayResolver | None = None  # set by whoever serves overlays (the Lab's auras)
        self.adapter_factory = adapter_factory
        self._factory, self._clock, self._probe = adapter_factory, clock, memory_probe
        self._serving: dict[str, Instance] = {}
        self._copies: list[Instance] = []
        self._loading: set[str] = set()
        self._load_errors: dict[str, str] = {}
        self._load_lock = asyncio.Lock()
        self._serial = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the pool lives on (threads reach it through it)."""
        self._loop = loop

    # --- the ledger ------------------------------------------------------------------------
    def instances(self, purpose: str | None = None) -> list[Instance]:
        every = [*self._serving.values(), *self._copies]
        return [i for i in every if purpose is None or i.purpose == purpose]

    def state(self, model_id: str) -> str:
        if model_id in self._serving:
            return "loaded"
        if model_id in self._loading:
            return "loading"
        return "failed" if model_id in self._load_errors else "unloaded"

    def load_error(self, model_id: str) -> str | None:
        return self._load_errors.get(model_id)

    def resident(self) -> list[str]:
        """Ids of the models loaded for serving."""
        return list(self._serving)

    def residents(self) -> list[Instance]:
        return list(self._serving.values())

    def serving(self, model_id: str) -> Instance | None:
        return self._serving.get(model_id)

    def now(self) -> float:
        return self._clock()

    def used_memory(self) -> int:
        return sum(i.memory for i in self.instances())

    def room_for(self, record: ModelRecord, purpose: str = LAB) -> int:
        """Bytes left for a private copy's working set once the copy is in: the budget minus what busy
        instances hold (idle ones give way) minus the copy itself unless an idle one is loaded."""
        every = self.instances()
        busy = sum(i.memory for i in every if i.busy)
        idle_copy = any(i.model_id == record.id and i.purpose == purpose and not i.busy for i in every)
        return self.config.max_memory - busy - (0 if idle_copy else self._factory(record).memory_estimate())

    # --- serving leases --------------------------------------------------------------------
    async def acquire(self, name: str, *, keep_alive: str | float | None = None,
                      disconnected: Callable[[], Awaitable[None]] | None = None) -> Lease:
        """A lease on the model `name` (id, alias, role, `default`, or `base+overlay`): loads it if
        needed, then waits in FIFO order for a free slot. `disconnected` resolves when the client leaves."""
        self._loop = asyncio.get_running_loop()
        record, overlay = await self._resolve(name)
        requested_keep_alive = parse_keep_alive(keep_alive)
        instance = self._serving.get(record.id) or await self.load(record.id)
        if instance.free.empty() and instance.waiting >= self.config.max_queue:
            raise QueueFull(f"Model `{record.id}` has {instance.waiting} requests waiting; try again shortly.",
                            retry_after=max(1, instance.waiting // max(len(instance.workers), 1)))
        instance.waiting += 1
        self._gauges(instance)
        try:
            worker = await self._take_slot(instance, disconnected)
        finally:
            instance.waiting -= 1
        self._claim(instance)
        if requested_keep_alive is not None:
            instance.keep_alive = requested_keep_alive
        self._gauges(instance)
        self.registry.record_use(record.id)
        return Lease(self, instance, worker, overlay, loop=self._loop)

    async def _resolve(self, name: str) -> tuple[ModelRecord, Overlay | None]:
        base, sep, overlay_name = name.partition(OVERLAY_SEPARATOR)
        if not sep:
            return self.registry.resolve(name), None
        record = self.registry.resolve(base)
        if self.overlays is None or not overlay_name:
            raise ModelNotFound(name)
        return record, await asyncio.to_thread(self.overlays, record, overlay_name)

    def overlay_models(self) -> list[tuple[str, float]]:
        """(`base+overlay`, created) for every overlay the resolver lists whose base is a usable model
        (reads files: call it off the event loop)."""
        listing = getattr(self.overlays, "listing", None)
        if listing is None:
            return []
        usable = {r.id for r in self.registry.usable()}
        return [(f"{base}{OVERLAY_SEPARATOR}{name}", created) for base, name, created in listing() if base in usable]

    async def _take_slot(self, instance: Instance, disconnected) -> ModelWorker:
        if disconnected is None or not instance.free.empty():
            return await instance.free.get()
        take = asyncio.ensure_future(instance.free.get())
        gone = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({take, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if take in done:
            return take.result()
        take.cancel()  # leaves the queue; a slot it raced for goes back
        if take.done() and not take.cancelled():
            instance.free.put_nowait(take.result())
        raise ClientGone("The client disconnected while waiting for the model.")

    def _claim(self, instance: Instance) -> None:
        instance.active += 1
        instance.idle.clear()
        instance.expires_at = None
        instance.last_used = self._clock()

    def _release(self, instance: Instance, worker: ModelWorker) -> None:
        instance.active -= 1
        instance.last_used = self._clock()
        instance.free.put_nowait(worker)
        if instance.purpose == SERVE:
            self._gauges(instance)
        if instance.busy:
            return
        instance.idle.set()
        if instance.purpose == LAB:
            self._drop_idle_copies(keep=self.config.max_copies)
            if instance.unload_when_idle:
                self._unload(instance, "evicted")
        elif instance.unload_when_idle or instance.keep_alive == 0:
            self._unload(instance, "keep_alive" if instance.keep_alive == 0 else "evicted")
        elif instance.keep_alive != FOREVER:
            instance.expires_at = instance.last_used + instance.keep_alive

    # --- private copies (the Lab's) --------------------------------------------------------
    async def checkout(self, record: ModelRecord, *, purpose: str = LAB, progress: ProgressFn | None = None) -> Lease:
        """An instance of `record` for this holder alone: an idle copy of the same model, or a new one
        (idle copies beyond max_copies are dropped first, least recently used first)."""
        self._loop = asyncio.get_running_loop()
        instance = next((c for c in self._copies if c.model_id == record.id and c.purpose == purpose
                         and not c.busy and not c.unload_when_idle), None)
        if instance is None:
            async with self._load_lock:
                self._drop_idle_copies(keep=self.config.max_copies - 1)
                key = f"{purpose}:{record.id}:{next(self._serial)}"
                instance = await self._load_instance(record, purpose, key, progress)
                self._copies.append(instance)
        self._claim(instance)
        return Lease(self, instance, instance.free.get_nowait(), loop=self._loop)

    def checkout_blocking(self, record: ModelRecord, *, purpose: str = LAB,
                          progress: ProgressFn | None = None) -> Lease:
        """checkout() from a thread other than the event loop's (a Lab job's): blocks until it has the copy."""
        return self._on_loop(self.checkout(record, purpose=purpose, progress=progress))

    def acquire_blocking(self, name: str) -> Lease:
        """acquire() from a thread other than the event loop's (a Lab job's)."""
        return self._on_loop(self.acquire(name))

    def call_blocking(self, lease: Lease, fn) -> object:
        """lease.call(fn) from a thread other than the event loop's."""
        return self._on_loop(lease.call(fn))

    def _on_loop(self, coroutine):
        if self._loop is None:
            coroutine.close()
            raise RuntimeError("the model pool is not bound to an event loop yet")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def discard(self, lease: Lease) -> None:
        """Give a copy back and unload it (it turned out unusable for its holder)."""
        lease.instance.unload_when_idle = True
        lease.release()

    def _drop_idle_copies(self, keep: int) -> None:
        idle = sorted((c for c in self._copies if not c.busy), key=lambda c: c.last_used)
        while idle and len(self._copies) > max(keep, 0):
            self._unload(idle.pop(0), "evicted")

    # --- loading and unloading -------------------------------------------------------------
    async def load(self, model_id: str, progress: ProgressFn | None = None) -> Instance:
        """Load `model_id` for serving (or return it if it is loaded)."""
        record = self.registry.get(model_id)
        async with self._load_lock:  # one load at a time; loaded models keep serving meanwhile
            if (instance := self._serving.get(model_id)) is not None:
                return instance
            self._loading.add(model_id)
            try:
                instance = await self._load_instance(record, SERVE, model_id, progress)
            except OpenAIError as exc:
                self._load_errors[model_id] = exc.message
                self.metrics.loads.labels(model_id, "failed").inc()
                raise
            finally:
                self._loading.discard(model_id)
            self._load_errors.pop(model_id, None)
            self._serving[model_id] = instance
            self.registry.set_live_capabilities(model_id, ordered(instance.adapter.capabilities))
            self.metrics.loads.labels(model_id, "ok").inc()
            self._gauges(instance)
            return instance

    async def _load_instance(self, record: ModelRecord, purpose: str, key: str, progress) -> Instance:
        """Check, make room for and load one instance (call with the load lock held). Every failure is
        an OpenAIError, and a failed load leaves nothing behind."""
        what = f"Model `{record.id}`" if purpose == SERVE else f"The Lab's copy of `{record.id}`"
        try:
            await asyncio.to_thread(self.registry.check_integrity, record)  # hashes every byte of a locked model
            slots = record.manifest.parallel if purpose == SERVE else 1
            adapters = [self._factory(record) for _ in range(slots)]
            estimate = sum(a.memory_estimate() for a in adapters)
            too_big(estimate, self.config.max_memory, what)
            await make_room(self, estimate, what, serving=purpose == SERVE)
            started, before = time.perf_counter(), self._probe()
            workers = await _start_workers(adapters, progress)
        except OpenAIError:
            raise
        except EngineError as exc:
            raise from_engine(exc) from exc
        except Exception as exc:
            log.exception("loading %s failed", key)
            raise ModelLoadError(f"{what} failed to load: {exc}") from exc
        seconds = time.perf_counter() - started
        keep_alive = parse_keep_alive(record.manifest.keep_alive, "keep_alive") if purpose == SERVE else FOREVER
        instance = Instance(key, record, purpose, workers, estimate,
                            self.config.keep_alive if keep_alive is None else keep_alive, self._clock(),
                            measured=max(0, self._probe() - before))
        for worker in workers:
            instance.free.put_nowait(worker)
        instance.idle.set()
        if instance.keep_alive != FOREVER:  # loaded but never used: it expires like an idle one
            instance.expires_at = instance.last_used + instance.keep_alive
        if purpose == SERVE:
            self.registry.record_load(record.id, seconds)
        log.info("loaded %s (%s, %s) in %.2fs: estimated %d MiB, measured %d MiB", key, record.manifest.backend,
                 purpose, seconds, estimate >> 20, instance.measured >> 20)
        return instance

    def _unload(self, instance: Instance, reason: str) -> None:
        if instance.purpose == SERVE:
            if self._serving.get(instance.key) is not instance:
                return
            del self._serving[instance.key]
            self.registry.set_live_capabilities(instance.key, None)
            self.metrics.evictions.labels(instance.key, reason).inc()
            try:
                self.metrics.memory.remove(instance.key)
            except KeyError:  # never had a reading
                pass
            self.metrics.resident.set(len(self._serving))
        elif instance in self._copies:
            self._copies.remove(instance)
        else:
            return
        for worker in instance.workers:
            worker.stop()
        log.info("unloading %s (%s)", instance.key, reason)

    async def unload(self, model_id: str) -> bool:
        """Unload a serving instance now if idle, else as soon as its last request ends. False if not loaded."""
        self.registry.get(model_id)
        instance = self._serving.get(model_id)
        if instance is None:
            return False
        if instance.busy:
            instance.unload_when_idle = True
        else:
            self._unload(instance, "requested")
        return True

    def reap(self) -> list[str]:
        """Unload idle serving instances whose keep-alive ran out; returns their ids."""
        now = self._clock()
        expired = [i for i in self._serving.values()
                   if not i.busy and i.expires_at is not None and i.expires_at <= now]
        for instance in expired:
            self._unload(instance, "expired")
        return [i.key for i in expired]

    async def reaper(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reap()

    async def close(self) -> None:
        for instance in self.instances():
            self._unload(instance, "shutdown")

    def _gauges(self, instance: Instance) -> None:
        self.metrics.queue_depth.labels(instance.key).set(instance.waiting)
        self.metrics.active.labels(instance.key).set(instance.active)
        self.metrics.memory.labels(instance.key).set(instance.memory)
        self.metrics.resident.set(len(self._serving))


async def _start_workers(adapters: list[Adapter], progress: ProgressFn | None) -> list[ModelWorker]:
    workers: list[ModelWorker] = []
    try:
        for i, adapter in enumerate(adapters):
            worker = ModelWorker(adapter)
            workers.append(worker)
            slot_progress = None if progress is None else (
                lambda f, i=i: progress((i + f) / len(adapters)))
            await worker.start(slot_progress)
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    return workers
