"""ModelRouter: resolves a request's model, loads it on first use, hands out its worker."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from adapters.base import Adapter
from adapters.worker import ModelWorker
from server.errors import ModelLoadError, OpenAIError
from server.registry import ModelRecord, Registry

__all__ = ["ModelRouter"]

log = logging.getLogger("omniloader.router")

AdapterFactory = Callable[[ModelRecord], Adapter]


class ModelRouter:
    """First cut: any number of resident models, one load at a time, unload on request.
    Requests to one model are serialized FIFO by its worker."""

    def __init__(self, registry: Registry, adapter_factory: AdapterFactory) -> None:
        self.registry = registry
        self._factory = adapter_factory
        self._workers: dict[str, ModelWorker] = {}
        self._loading: set[str] = set()
        self._load_errors: dict[str, str] = {}
        self._load_lock = asyncio.Lock()

    def state(self, model_id: str) -> str:
        if model_id in self._workers:
            return "loaded"
        if model_id in self._loading:
            return "loading"
        return "failed" if model_id in self._load_errors else "unloaded"

    def resident(self) -> list[str]:
        return list(self._workers)

    def load_error(self, model_id: str) -> str | None:
        return self._load_errors.get(model_id)

    async def acquire(self, name: str) -> ModelWorker:
        """The worker serving `name` (id, alias or `default`), loading the model if needed."""
        record = self.registry.resolve(name)
        worker = self._workers.get(record.id)
        return worker if worker is not None else await self.load(record.id)

    async def load(self, model_id: str) -> ModelWorker:
        record = self.registry.get(model_id)
        async with self._load_lock:  # one load at a time; waiters for the same model reuse it
            if (worker := self._workers.get(model_id)) is not None:
                return worker
            self._loading.add(model_id)
            started = time.perf_counter()
            try:
                worker = ModelWorker(self._factory(record))
                try:
                    await worker.start()
                except BaseException:
                    worker.stop()
                    raise
            except OpenAIError as exc:
                self._load_errors[model_id] = exc.message
                raise
            except Exception as exc:
                log.exception("loading %s failed", model_id)
                self._load_errors[model_id] = str(exc)
                raise ModelLoadError(f"Model `{model_id}` failed to load: {exc}") from exc
            finally:
                self._loading.discard(model_id)
            self._load_errors.pop(model_id, None)
            self._workers[model_id] = worker
            log.info("loaded %s (%s) in %.2fs", model_id, record.manifest.backend,
                     time.perf_counter() - started)
            return worker

    async def unload(self, model_id: str) -> bool:
        """Stop routing to the model; it is freed once its queued requests finish."""
        self.registry.get(model_id)
        worker = self._workers.pop(model_id, None)
        if worker is None:
            return False
        worker.stop()
        log.info("unloading %s", model_id)
        return True

    async def close(self) -> None:
        for model_id in list(self._workers):
            await self.unload(model_id)
