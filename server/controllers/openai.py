"""/v1: the OpenAI API surface."""
from __future__ import annotations

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.response import Stream

from adapters.base import Adapter, Capability, GenerateParams
from server.controllers.auth import require_api_key
from server.controllers.leases import acquire, leased, released_after
from server.errors import CapabilityNotSupported, decode_body
from server.protocol.chat import ChatCompletionRequest
from server.protocol.completions import CompletionRequest
from server.protocol.embeddings import EmbeddingList, EmbeddingRequest
from server.protocol.models import OpenAIModel, OpenAIModelList
from server.router import ModelRouter
from server.serving.chat import chat_completion, chat_events
from server.serving.completions import CompletionJob, completion_events, text_completion
from server.serving.embeddings import embed
from server.serving.generation import (
    Generation,
    chat_params,
    chat_tool_mode,
    completion_params,
)
from server.serving.sse import SSE_HEADERS
from server.serving.tools import ToolMode

__all__ = ["OpenAIController", "require_capability", "require_chat_capabilities", "samples"]


def _sse(body) -> Stream:
    return Stream(body, media_type="text/event-stream", headers=SSE_HEADERS)


def require_capability(adapter: Adapter, capability: str, param: str) -> None:
    if capability not in adapter.capabilities:
        raise CapabilityNotSupported(f"Model `{adapter.id}` (backend {adapter.backend}) does not support "
                                     f"`{capability}`.", param=param)


def require_chat_capabilities(adapter: Adapter, mode: ToolMode, params: GenerateParams, *, input_param: str,
                              format_param: str) -> None:
    """What a chat request needs of the model (chat, tools, a JSON constraint, logprobs): a 400
    naming model and capability when it lacks one, never a silent fallback."""
    require_capability(adapter, Capability.CHAT, input_param)
    if mode.kind != "none":
        require_capability(adapter, Capability.TOOLS, "tools")
    if params.json_schema is not None:
        require_capability(adapter, Capability.JSON_SCHEMA, "tools" if mode.kind == "forced" else format_param)
    if params.logprobs:
        require_capability(adapter, Capability.LOGPROBS, "logprobs")


def samples(params: GenerateParams, n: int) -> list[GenerateParams]:
    """n independent samples: seed, seed+1, ... when a seed is given (reproducible), else random."""
    if n == 1:
        return [params]
    return [msgspec.structs.replace(params, seed=None if params.seed is None else params.seed + i) for i in range(n)]


def _include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


class OpenAIController(Controller):
    path = "/v1"
    guards = [require_api_key]

    @get("/models")
    async def list_models(self, router: NamedDependency[ModelRouter]) -> OpenAIModelList:
        registry = router.registry
        return OpenAIModelList(data=[OpenAIModel(id=r.id, created=registry.scanned_at) for r in registry.usable()])

    @post("/chat/completions", status_code=200)
    async def chat_completions(self, request: Request, router: NamedDependency[ModelRouter]) -> Response:
        req: ChatCompletionRequest = decode_body(await request.body(), ChatCompletionRequest)
        mode = chat_tool_mode(req)
        params = chat_params(req, {}, mode)  # validates before any model is loaded
        lease = await acquire(router, request, req.model, req.keep_alive)
        try:
            adapter = lease.adapter
            require_chat_capabilities(adapter, mode, params, input_param="messages", format_param="response_format")
            params = chat_params(req, adapter.manifest.defaults, mode)
            gens = [Generation(lease, p, "chat") for p in samples(params, req.n)]
            await gens[0].start()  # errors before the first token become a real HTTP status
        except BaseException:
            lease.release()
            raise
        if req.stream:
            return _sse(released_after(lease, chat_events(gens, adapter.id, mode, _include_usage(req),
                                                          params.logprobs)))
        try:
            return Response(await chat_completion(gens, adapter.id, mode, params.logprobs))
        finally:
            lease.release()

    @post("/completions", status_code=200)
    async def completions(self, request: Request, router: NamedDependency[ModelRouter]) -> Response:
        req: CompletionRequest = decode_body(await request.body(), CompletionRequest)
        lease = await acquire(router, request, req.model, req.keep_alive)
        try:
            adapter = lease.adapter
            require_capability(adapter, Capability.COMPLETION, "prompt")
            if req.logprobs is not None:
                require_capability(adapter, Capability.LOGPROBS, "logprobs")
            prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            defaults = adapter.manifest.defaults
            jobs = [CompletionJob(Generation(lease, p, "completion"), prompt, req.echo, req.logprobs)
                    for prompt in prompts for p in samples(completion_params(req, prompt, defaults), req.n)]
            await jobs[0].begin()
        except BaseException:
            lease.release()
            raise
        if req.stream:
            return _sse(released_after(lease, completion_events(jobs, adapter.id, _include_usage(req))))
        try:
            return Response(await text_completion(jobs, adapter.id))
        finally:
            lease.release()

    @post("/embeddings", status_code=200)
    async def embeddings(self, request: Request, router: NamedDependency[ModelRouter]) -> EmbeddingList:
        req: EmbeddingRequest = decode_body(await request.body(), EmbeddingRequest)
        async with leased(router, request, req.model, req.keep_alive) as lease:
            require_capability(lease.adapter, Capability.EMBEDDINGS, "model")
            return await embed(lease, req)
