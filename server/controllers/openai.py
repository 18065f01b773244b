"""/v1: the OpenAI API surface."""
from __future__ import annotations

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.response import Stream

from server.controllers.auth import require_api_key
from server.errors import decode_body
from server.protocol.chat import ChatCompletionRequest
from server.protocol.completions import CompletionRequest
from server.protocol.models import OpenAIModel, OpenAIModelList
from server.router import ModelRouter
from server.serving.chat import chat_completion, chat_events
from server.serving.completions import completion_events, text_completion
from server.serving.generation import Generation, chat_params, completion_params
from server.serving.sse import SSE_HEADERS

__all__ = ["OpenAIController"]


def _sse(body) -> Stream:
    return Stream(body, media_type="text/event-stream", headers=SSE_HEADERS)


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
        worker = await router.acquire(req.model)
        gen = Generation(worker, chat_params(req, worker.adapter.manifest.defaults), "chat")
        await gen.start()  # errors before the first token become a real HTTP status
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(chat_events(gen, worker.adapter.id, include_usage))
        return Response(await chat_completion(gen, worker.adapter.id))

    @post("/completions", status_code=200)
    async def completions(self, request: Request, router: NamedDependency[ModelRouter]) -> Response:
        req: CompletionRequest = decode_body(await request.body(), CompletionRequest)
        worker = await router.acquire(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        defaults = worker.adapter.manifest.defaults
        gens = [Generation(worker, completion_params(req, p, defaults), "completion") for p in prompts]
        await gens[0].start()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(completion_events(gens, worker.adapter.id, include_usage))
        return Response(await text_completion(gens, worker.adapter.id))
