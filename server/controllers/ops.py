"""Operational endpoints: health, readiness, resident models, system facts, Prometheus metrics."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import platform
import time

from litestar import MediaType, Response, get
from litestar.di import NamedDependency

from server.controllers.auth import require_api_key
from server.errors import OpenAIError
from adapters.errors import EngineError
from adapters.machine import accelerators, physical_cores, total_ram
from server.keep_alive import FOREVER
from server.metrics import CONTENT_TYPE
from server.protocol.ops import Health, RunningModel, RunningModels, SystemInfo
from server.runtime import ModelPool

__all__ = ["ops_handlers"]


@get("/health")
async def health(pool: NamedDependency[ModelPool]) -> Health:
    return Health(status="ok", models=pool.resident())


@get("/health/ready")
async def ready(pool: NamedDependency[ModelPool]) -> Response:
    """503 until the default model can be loaded (its files are there), 200 after."""
    try:
        record = pool.registry.resolve("default")
        loadable = record.id in pool.resident() or record.source_path().is_file()
    except (OpenAIError, EngineError):  # unknown default, or its package is not installed
        loadable = False
    return Response(Health(status="ready" if loadable else "not_ready", models=pool.resident()),
                    status_code=200 if loadable else 503)


def _expires(pool: ModelPool, expires_at: float | None) -> str | None:
    if expires_at is None:
        return None
    wall = time.time() + (expires_at - pool.now())
    return dt.datetime.fromtimestamp(wall, dt.timezone.utc).isoformat()


@get("/api/ps", guards=[require_api_key])
async def running_models(pool: NamedDependency[ModelPool]) -> RunningModels:
    models = [RunningModel(id=r.record.id, backend=r.record.manifest.backend, memory_bytes=r.memory,
                           estimated_bytes=r.estimate, measured_bytes=r.measured, active=r.active, queued=r.waiting,
                           parallel=len(r.workers), keep_alive=None if r.keep_alive == FOREVER else r.keep_alive,
                           expires_at=_expires(pool, r.expires_at))
              for r in pool.residents()]
    return RunningModels(models, pool.config.max_memory, pool.used_memory())


@get("/api/system", guards=[require_api_key])
async def system(pool: NamedDependency[ModelPool]) -> SystemInfo:
    found = await asyncio.to_thread(accelerators)
    return SystemInfo(platform=platform.platform(), python=platform.python_version(), cpu_count=os.cpu_count() or 1,
                      physical_cores=physical_cores(), ram_bytes=total_ram(),
                      memory_budget_bytes=pool.config.max_memory, accelerators=list(found),
                      default_threads=physical_cores())


@get("/metrics", media_type=MediaType.TEXT)
async def metrics(pool: NamedDependency[ModelPool]) -> Response:
    return Response(pool.metrics.render(), media_type=CONTENT_TYPE)


ops_handlers = [health, ready, running_models, system, metrics]
