"""One owner thread per loaded model. Every adapter call runs there, in FIFO order, so the
token loop never touches the event loop and a new request never interrupts a running one."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from adapters.base import Adapter

__all__ = ["ModelWorker", "TokenStream"]

log = logging.getLogger("omniloader.worker")

_ITEM, _ERROR, _END = 0, 1, 2
# How long the worker waits for the consumer to ask for the next item before computing it anyway.
PULL_TIMEOUT = 0.05


class TokenStream:
    """The event-loop side of one streamed request: an async iterator over the worker's items.
    Closing it (client gone) sets `cancel`, which the worker checks between tokens.

    The worker computes item k+1 once the consumer has asked for it (or PULL_TIMEOUT passed):
    on a machine whose cores are all busy decoding, the event loop would otherwise wait for a
    time slice to send each token, which costs more than the short pause it takes to send it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._wanted = threading.Semaphore(0)
        self.cancel = threading.Event()

    def _send(self, kind: int, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
            self.cancel.set()

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> Any:
        self._wanted.release()
        kind, value = await self._queue.get()
        if kind == _ITEM:
            return value
        if kind == _ERROR:
            raise value
        raise StopAsyncIteration

    def close(self) -> None:
        """The consumer is done (finished, failed or gone): stop generating for it."""
        self.cancel.set()
        self._wanted.release()  # wake a worker waiting for this consumer

    def wait_until_wanted(self) -> None:
        self._wanted.acquire(timeout=PULL_TIMEOUT)


class ModelWorker:
    """Owns one adapter on a dedicated thread; requests queue up in arrival order."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"model:{adapter.id}", daemon=True)
        self.pending = 0  # requests queued or running, for status and eviction decisions

    async def start(self, progress: Callable[[float], None] | None = None) -> None:
        """Start the thread and load the model on it; raises what load() raised. `progress` is
        called on the event loop with the fraction loaded, when the backend reports it."""
        self._thread.start()
        loop = asyncio.get_running_loop()
        report = None if progress is None else (lambda f: loop.call_soon_threadsafe(progress, f))
        await self.call(lambda adapter: adapter.load(report))

    async def call(self, fn: Callable[[Adapter], Any]) -> Any:
        """Run fn(adapter) on the model's thread, in turn, and return its result."""
        stream = self.stream(lambda adapter, _cancel: iter((fn(adapter),)))
        try:
            return await anext(stream)
        finally:
            stream.close()  # nothing more is wanted: the worker moves on at once

    def stream(self, fn: Callable[[Adapter, threading.Event], Iterator[Any]]) -> TokenStream:
        """Queue fn(adapter, cancel) -> iterator; its items arrive on the returned TokenStream."""
        stream = TokenStream(asyncio.get_running_loop())
        self.pending += 1
        self._jobs.put((fn, stream))
        return stream

    def stop(self) -> None:
        """Unload once the requests already queued have finished."""
        self._jobs.put(None)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, stream = job
            items = None
            try:
                if not stream.cancel.is_set():  # a client that left while queued costs nothing
                    items = fn(self.adapter, stream.cancel)
                    while True:
                        stream.wait_until_wanted()
                        if stream.cancel.is_set():
                            break
                        try:
                            item = next(items)
                        except StopIteration:
                            break
                        stream._send(_ITEM, item)
            except BaseException as exc:  # passed to the request as a value, never kills the thread
                stream._send(_ERROR, exc)
            finally:
                if hasattr(items, "close"):
                    items.close()  # runs the generator's cleanup now, on this thread
                stream._send(_END, None)
                if not stream._loop.is_closed():
                    stream._loop.call_soon_threadsafe(self._done)
        try:
            self.adapter.unload()
        except Exception:
            log.exception("unloading %s failed", self.adapter.id)

    def _done(self) -> None:
        self.pending -= 1
