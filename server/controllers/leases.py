"""Holding a model lease for exactly as long as a response needs it."""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from litestar import Request

from server.router import Lease, ModelRouter

__all__ = ["disconnect_watcher", "acquire", "leased", "released_after"]


def disconnect_watcher(request: Request) -> Callable[[], Awaitable[None]]:
    """Resolves when the client goes away (the body is already read, so the next ASGI message
    can only be the disconnect): a request waiting in a model's queue then leaves it."""

    async def wait() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return wait


async def acquire(router: ModelRouter, request: Request, model: str, keep_alive=None) -> Lease:
    """A lease on `model` for this request (which then counts in metrics under that model)."""
    lease = await router.acquire(model, keep_alive=keep_alive, disconnected=disconnect_watcher(request))
    request.state.model = lease.model_id
    return lease


@asynccontextmanager
async def leased(router: ModelRouter, request: Request, model: str, keep_alive=None) -> AsyncIterator[Lease]:
    """A lease for a non-streamed response: released when the block ends, however it ends."""
    lease = await acquire(router, request, model, keep_alive)
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
