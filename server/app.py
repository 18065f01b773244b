"""create_app(settings) -> Litestar: the whole server, with no module-level state."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide

from adapters import create_adapter
from server.controllers.models import ModelsController
from server.controllers.openai import OpenAIController
from server.controllers.auras import AurasController
from server.controllers.lab import LabController
from server.controllers.ops import ops_handlers
from server.controllers.responses import ResponsesController
from server.controllers.skillpacks import SkillpacksController
from server.errors import exception_handlers
from server.keep_alive import parse_keep_alive
from server.lab.auras import AuraResolver
from server.lab.service import Lab
from adapters.machine import parse_size
from server.metrics import Metrics
from server.middleware import RequestMetricsMiddleware
from server.registry import Registry
from server.runtime import AdapterFactory, ModelPool, PoolConfig
from server.serving.recent import RecentCompletions
from server.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger("omniloader")


def create_app(settings: Settings | None = None, *, adapter_factory: AdapterFactory | None = None) -> Litestar:
    settings = settings or Settings()
    registry = Registry(Path(settings.models_dir), default_model=settings.default_model, lab_dir=Path(settings.lab_dir))
    if adapter_factory is None:
        def adapter_factory(record):
            return create_adapter(record, settings)
    config = PoolConfig(max_memory=parse_size(settings.max_memory), max_loaded=settings.max_loaded,
                        max_queue=settings.max_queue, keep_alive=parse_keep_alive(settings.keep_alive),
                        max_copies=max(1, settings.lab_max_copies))
    metrics = Metrics()
    pool = ModelPool(registry, adapter_factory, config, metrics=metrics)  # every loaded instance, one budget
    lab = Lab(registry, Path(settings.lab_dir), pool, jobs_per_model=settings.lab_jobs_per_model,
              max_running=settings.lab_max_running,
              budget_available=pool.room_for)  # room for a job's working set
    recent = RecentCompletions()  # chat completions a correction may name (POST /lab/queue completion_id)
    lab.teaching.recent = recent
    pool.overlays = AuraResolver(lab.auras)  # `model: "base+aura"`
    background: set[asyncio.Task] = set()

    def on_startup() -> None:
        registry.scan()
        Path(settings.lab_dir).mkdir(parents=True, exist_ok=True)
        names = ", ".join(r.id for r in registry.usable())
        bad = [r.manifest_path for r in registry.records() if r.error]
        log.info("OmniLoader on http://%s:%d/v1 | default: %s | models: %s%s | memory budget %d MiB",
                 settings.host, settings.port, settings.default_model, names,
                 f" | invalid manifests: {', '.join(bad)}" if bad else "", config.max_memory >> 20)
        pool.bind(asyncio.get_running_loop())
        background.add(asyncio.get_running_loop().create_task(pool.reaper()))
        lab.queue.start()

    async def on_shutdown() -> None:
        for task in background:
            task.cancel()
        await asyncio.to_thread(lab.queue.close)
        await pool.close()

    return Litestar(
        route_handlers=[OpenAIController, ResponsesController, ModelsController, LabController, AurasController,
                        SkillpacksController,
                        *ops_handlers],
        dependencies={"pool": Provide(lambda: pool, use_cache=True, sync_to_thread=False),
                      "lab": Provide(lambda: lab, use_cache=True, sync_to_thread=False),
                      "recent": Provide(lambda: recent, use_cache=True, sync_to_thread=False)},
        exception_handlers=exception_handlers,
        on_startup=[on_startup],
        on_shutdown=[on_shutdown],
        state=State({"settings": settings, "pool": pool, "metrics": metrics, "lab": lab}),
        middleware=[RequestMetricsMiddleware(metrics)],
        logging_config=None,
        openapi_config=None,
    )
