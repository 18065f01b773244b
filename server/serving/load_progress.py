"""SSE progress of a model load: `{"status": "loading", "progress": f}` events, then `loaded`
(or an in-band error), then [DONE]."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from server.protocol.models import LoadProgress
from server.runtime import ModelPool
from server.serving.sse import DONE, error_event, event

__all__ = ["load_events"]

STEP = 0.02  # report every 2% at most: llama.cpp calls back once per tensor


async def load_events(pool: ModelPool, model_id: str) -> AsyncIterator[bytes]:
    started = time.perf_counter()

    def report(status: str, fraction: float) -> bytes:
        return event(LoadProgress(model_id, status, round(fraction, 3), round(time.perf_counter() - started, 3)))

    if model_id in pool.resident():
        yield report("loaded", 1.0)
        yield DONE
        return
    updates: asyncio.Queue[float] = asyncio.Queue()
    loading = asyncio.ensure_future(pool.load(model_id, progress=updates.put_nowait))
    yield report("loading", 0.0)
    sent = 0.0

    def worth_reporting(fraction: float) -> bool:
        nonlocal sent
        if fraction - sent >= STEP and fraction < 1.0:
            sent = fraction
            return True
        return False

    try:
        while not loading.done():
            getter = asyncio.ensure_future(updates.get())
            await asyncio.wait({getter, loading}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            if worth_reporting(fraction := getter.result()):
                yield report("loading", fraction)
        loading.result()
        while not updates.empty():  # reports that arrived with the end of the load are still news
            if worth_reporting(fraction := updates.get_nowait()):
                yield report("loading", fraction)
        yield report("loaded", 1.0)
    except Exception as exc:
        yield error_event(exc)
    yield DONE
