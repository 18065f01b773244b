"""One generation lifecycle for every wire protocol: lease -> checks -> first token -> stream or
collect -> release, exactly once, however the request ends.

A surface (OpenAI chat, completions, Responses, and the protocols that come next) describes itself
with a Surface — its log label and its names for what engines hint at — and hands
`run_generation` two functions: `start(lease)` (capability checks, params with the manifest's
defaults, start the first generation: anything that fails here is a real HTTP status) and the
renderer of what started, streamed (SSE bytes) or collected (one response object)."""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from litestar import Request, Response
from litestar.response import Stream

from adapters.base import Adapter, Delta, GenerateParams
from adapters.errors import HINT_PROMPT, HINT_SCHEMA, EngineError
from adapters.worker import TokenStream
from server.errors import CapabilityNotSupported, from_engine
from server.runtime import Lease, ModelPool
from server.serving.sse import SSE_HEADERS

__all__ = ["Surface", "CHAT", "COMPLETION", "Generation", "acquire", "leased", "released_after", "run_generation",
           "require_capability", "disconnect_watcher"]

log = logging.getLogger("omniloader.requests")

T = TypeVar("T")


@dataclass(frozen=True)
class Surface:
    """A wire protocol as the lifecycle sees it: a label for logs and metrics, and the field names
    its requests give to what engines hint at (engine errors then name the client's own field)."""

    endpoint: str
    names: dict[str, str] = field(default_factory=dict)

    def naming(self, **names: str) -> Surface:
        """This surface with some hints renamed for one request (a schema that came from a forced tool)."""
        return Surface(self.endpoint, {**self.names, **names})

    def error(self, exc: EngineError):
        return from_engine(exc, self.names)


CHAT = Surface("chat", {HINT_PROMPT: "messages", HINT_SCHEMA: "response_format"})
COMPLETION = Surface("completion", {HINT_PROMPT: "prompt"})


def require_capability(adapter: Adapter, capability: str, param: str) -> None:
    """A 400 naming model and capability when the loaded model lacks it, never a silent fallback."""
    if capability not in adapter.capabilities:
        raise CapabilityNotSupported(f"Model `{adapter.id}` (backend {adapter.backend}) does not support "
                                     f"`{capability}`.", param=param)


# --- leases held for exactly as long as a response needs them ----------------------------------
def disconnect_watcher(request: Request) -> Callable[[], Awaitable[None]]:
    """Resolves when the client goes away (the body is already read, so the next ASGI message
    can only be the disconnect): a request waiting in a model's queue then leaves it."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


async def acquire(pool: ModelPool, request: Request, model: str, keep_alive=None) -> Lease:
    """A lease on `model` for this request (which then counts in metrics under that model)."""
    lease = await pool.acquire(model, keep_alive=keep_alive, disconnected=disconnect_watcher(request))
    request.state.model = lease.model_id
    return lease


@asynccontextmanager
async def leased(pool: ModelPool, request: Request, model: str, keep_alive=None) -> AsyncIterator[Lease]:
    """A lease for a non-generating call (tokenize, embeddings): released when the block ends."""
    lease = await acquire(pool, request, model, keep_alive)
    try:
        yield lease
    finally:
        lease.release()


async def released_after(lease: Lease, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A streamed body that gives the lease back when it ends, fails or the client leaves."""
    try:
        async for chunk in body:
            yield chunk
    finally:
        await body.aclose()  # now, not at garbage collection: it stops the generation
        lease.release()


async def run_generation(pool: ModelPool, request: Request, *, model: str, keep_alive: Any, surface: Surface,
                         start: Callable[[Lease], Awaitable[T]],
                         stream: Callable[[T], AsyncIterator[bytes]] | None,
                         collect: Callable[[T], Awaitable[Any]]) -> Response:
    """The whole lifecycle of one generating request; `stream` None means a collected response."""
    lease = await acquire(pool, request, model, keep_alive)
    try:
        try:
            started = await start(lease)
        except EngineError as exc:
            raise surface.error(exc) from exc
    except BaseException:
        lease.release()
        raise
    if stream is not None:
        return Stream(released_after(lease, stream(started)), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        return Response(await collect(started))
    finally:
        lease.release()


# --- one generation in flight ------------------------------------------------------------------
@dataclass
class Generation:
    """One generation on a lease: start() waits for the first delta, so anything that fails before
    the first token (context too long, bad template) fails before any byte is sent. Engine errors
    become the surface's OpenAI errors here, before or after the first byte."""

    worker: Lease  # the request's hold on a model worker
    params: GenerateParams
    surface: Surface
    stream: TokenStream | None = None
    first: Delta | None = None
    started_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    async def start(self) -> Delta:
        params = self.worker.params(self.params)  # the lease's overlay, if any
        self.started_at = time.perf_counter()
        self.stream = self.worker.stream(lambda adapter, cancel: adapter.generate(params, cancel))
        try:
            self.first = await anext(self.stream)
        except EngineError as exc:
            self.stream.close()
            raise self.surface.error(exc) from exc
        except BaseException:
            self.stream.close()
            raise
        self.first_token_at = time.perf_counter()
        return self.first

    async def deltas(self):
        """All deltas, the first included; the last carries finish_reason and usage."""
        if self.first is None:
            await self.start()
        try:
            delta = self.first
            while True:
                yield delta
                if delta.finish_reason is not None:
                    self._log(delta)
                    return
                try:
                    delta = await anext(self.stream)
                except EngineError as exc:
                    raise self.surface.error(exc) from exc
        finally:
            self.stream.close()  # finished, failed or client gone: the worker stops within a token

    def _log(self, last: Delta) -> None:
        usage = last.usage
        ttft, total = (self.first_token_at or self.started_at) - self.started_at, time.perf_counter() - self.started_at
        if usage is not None:
            self.worker.observe_generation(usage.prompt_tokens, usage.completion_tokens, ttft, total)
        log.info("%s model=%s prompt_tokens=%s completion_tokens=%s ttft=%.3fs total=%.3fs finish=%s",
                 self.surface.endpoint, self.worker.name, usage and usage.prompt_tokens,
                 usage and usage.completion_tokens, ttft, total, last.finish_reason)

