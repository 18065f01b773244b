"""/api/models: native model management (list with load state, load, unload, register)."""
from __future__ import annotations

import asyncio

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery
from litestar.response import Stream

from server.controllers.auth import require_api_key
from server.serving.run import leased
from server.errors import InvalidRequestError, decode_body
from server.protocol.models import ModelInfo, ModelInfoList, ModelState, SelectionResult
from server.protocol.tokens import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenPiece,
)
from server.registry import ROLE_PREFIX, ModelRecord
from server.runtime import ModelPool
from server.serving.load_progress import load_events
from server.serving.sse import SSE_HEADERS

__all__ = ["ModelsController", "model_info"]


def model_info(record: ModelRecord, pool: NamedDependency[ModelPool]) -> ModelInfo:
    m = record.manifest
    if m is None:
        return ModelInfo(id=record.id, backend=None, source=None, origin=record.origin, state="invalid",
                         manifest_path=record.manifest_path, error=record.error)
    return ModelInfo(id=record.id, backend=m.backend, source=m.source, origin=record.origin,
                     state=pool.state(record.id), aliases=m.aliases, roles=m.roles,
                     capabilities=pool.registry.capabilities(record), context_length=m.context_length,
                     manifest_path=record.manifest_path, error=pool.load_error(record.id))


class ModelsController(Controller):
    path = "/api/models"
    guards = [require_api_key]

    @get("/")
    async def list_models(self, pool: NamedDependency[ModelPool]) -> ModelInfoList:
        return ModelInfoList(data=[model_info(r, pool) for r in pool.registry.records()])

    @get("/select")
    async def select(self, pool: NamedDependency[ModelPool], name: FromQuery[str | None] = None,
                     role: FromQuery[str | None] = None,
                     require: FromQuery[list[str] | None] = None) -> SelectionResult:
        """Which model `name` (id, alias, role:<role>) or `role` picks with the `require`d capabilities
        (comma-separated or repeated), why, and which candidates were passed over; 404 if none."""
        if (name is None) == (role is None):
            raise InvalidRequestError("Give exactly one of `name` or `role`.", param="name")
        return pool.registry.select(name if name is not None else ROLE_PREFIX + role, require).result()

    @post("/rescan", status_code=200)
    async def rescan(self, pool: NamedDependency[ModelPool]) -> ModelInfoList:
        """Re-read manifests and re-discover models/ now (hot reload), then list them."""
        await asyncio.to_thread(pool.registry.scan)
        return ModelInfoList(data=[model_info(r, pool) for r in pool.registry.records()])

    @post("/register", status_code=200)
    async def register(self, request: Request, pool: NamedDependency[ModelPool]) -> ModelInfo:
        record = pool.registry.register(await request.body())
        return model_info(record, pool)

    @post("/{model_id:str}/load", status_code=200)
    async def load(self, model_id: FromPath[str], pool: NamedDependency[ModelPool],
                   stream: FromQuery[bool] = False) -> Response:
        """Load now; with ?stream=true, SSE progress events while it loads."""
        record = pool.registry.resolve(model_id)
        if stream:
            return Stream(load_events(pool, record.id), media_type="text/event-stream", headers=SSE_HEADERS)
        await pool.load(record.id)
        return Response(ModelState(id=record.id, state=pool.state(record.id)))

    @post("/{model_id:str}/unload", status_code=200)
    async def unload(self, model_id: FromPath[str], pool: NamedDependency[ModelPool]) -> ModelState:
        record = pool.registry.resolve(model_id)
        await pool.unload(record.id)
        return ModelState(id=record.id, state=pool.state(record.id))

    @post("/{model_id:str}/tokenize", status_code=200)
    async def tokenize(self, model_id: FromPath[str], request: Request,
                       pool: NamedDependency[ModelPool]) -> TokenizeResponse:
        req: TokenizeRequest = decode_body(await request.body(), TokenizeRequest)
        def run(adapter):
            ids = adapter.tokenize(req.text, special=req.special)
            pieces = [TokenPiece(i, adapter.detokenize([i])) for i in ids] if req.with_pieces else None
            return ids, pieces

        async with leased(pool, request, model_id) as lease:
            ids, pieces = await lease.call(run)
        return TokenizeResponse(model=lease.model_id, tokens=ids, count=len(ids), pieces=pieces)

    @post("/{model_id:str}/detokenize", status_code=200)
    async def detokenize(self, model_id: FromPath[str], request: Request,
                         pool: NamedDependency[ModelPool]) -> DetokenizeResponse:
        req: DetokenizeRequest = decode_body(await request.body(), DetokenizeRequest)
        async with leased(pool, request, model_id) as lease:
            text = await lease.call(lambda adapter: adapter.detokenize(req.tokens))
        return DetokenizeResponse(model=lease.model_id, text=text)
