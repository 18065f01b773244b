"""/v1: the OpenAI API surface. Each generating route is one call to the generation lifecycle."""
from __future__ import annotations

import asyncio

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency

from adapters.base import Adapter, Capability, GenerateParams
from server.controllers.auth import require_api_key
from server.errors import decode_body
from server.protocol.chat import ChatCompletionRequest
from server.protocol.completions import CompletionRequest
from server.protocol.embeddings import EmbeddingList, EmbeddingRequest
from server.protocol.models import OpenAIModel, OpenAIModelList
from server.runtime import Lease, ModelPool
from server.serving.chat import chat_completion, chat_events
from server.serving.completions import CompletionJob, completion_events, text_completion
from server.serving.embeddings import embed
from server.serving.generation import chat_params, chat_tool_mode, completion_params
from server.serving.recent import RecentCompletions
from server.serving.run import CHAT, COMPLETION, Generation, leased, require_capability, run_generation
from server.serving.tools import ToolMode

__all__ = ["OpenAIController", "require_chat_capabilities", "samples"]


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
    async def list_models(self, pool: NamedDependency[ModelPool]) -> OpenAIModelList:
        registry = pool.registry
        models = [OpenAIModel(id=r.id, created=registry.scanned_at) for r in registry.usable()]
        overlays = await asyncio.to_thread(pool.overlay_models)  # `base+aura` for each stored aura
        return OpenAIModelList(data=models + [OpenAIModel(id=name, created=int(created)) for name, created in overlays])

    @post("/chat/completions", status_code=200)
    async def chat_completions(self, request: Request, pool: NamedDependency[ModelPool],
                               recent: NamedDependency[RecentCompletions]) -> Response:
        req: ChatCompletionRequest = decode_body(await request.body(), ChatCompletionRequest)
        mode = chat_tool_mode(req)
        params = chat_params(req, {}, mode)  # validates before any model is loaded
        surface = CHAT.naming(json_schema="tools") if mode.kind == "forced" else CHAT

        async def start(lease: Lease) -> list[Generation]:
            require_chat_capabilities(lease.adapter, mode, params, input_param="messages",
                                      format_param="response_format")
            full = chat_params(req, lease.defaults, mode)
            gens = [Generation(lease, p, surface) for p in samples(full, req.n)]
            await gens[0].start()  # errors before the first token become a real HTTP status
            return gens

        conversation = [msgspec.to_builtins(m) for m in req.messages]

        def stream(gens):
            name = gens[0].worker.name
            return chat_events(gens, name, mode, _include_usage(req), params.logprobs,
                               on_done=lambda cid, text: recent.record(cid, name, conversation, text))

        async def collect(gens):
            result = await chat_completion(gens, gens[0].worker.name, mode, params.logprobs)
            recent.record(result.id, result.model, conversation, result.choices[0].message.content or "")
            return result

        return await run_generation(pool, request, model=req.model, keep_alive=req.keep_alive, surface=surface,
                                    start=start, stream=stream if req.stream else None, collect=collect)

    @post("/completions", status_code=200)
    async def completions(self, request: Request, pool: NamedDependency[ModelPool]) -> Response:
        req: CompletionRequest = decode_body(await request.body(), CompletionRequest)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt

        async def start(lease: Lease) -> list[CompletionJob]:
            require_capability(lease.adapter, Capability.COMPLETION, "prompt")
            if req.logprobs is not None:
                require_capability(lease.adapter, Capability.LOGPROBS, "logprobs")
            jobs = [CompletionJob(Generation(lease, p, COMPLETION), prompt, req.echo, req.logprobs)
                    for prompt in prompts for p in samples(completion_params(req, prompt, lease.defaults), req.n)]
            await jobs[0].begin()
            return jobs

        def stream(jobs):
            return completion_events(jobs, jobs[0].gen.worker.name, _include_usage(req))

        async def collect(jobs):
            return await text_completion(jobs, jobs[0].gen.worker.name)

        return await run_generation(pool, request, model=req.model, keep_alive=req.keep_alive, surface=COMPLETION,
                                    start=start, stream=stream if req.stream else None, collect=collect)

    @post("/embeddings", status_code=200)
    async def embeddings(self, request: Request, pool: NamedDependency[ModelPool]) -> EmbeddingList:
        req: EmbeddingRequest = decode_body(await request.body(), EmbeddingRequest)
        async with leased(pool, request, req.model, req.keep_alive) as lease:
            require_capability(lease.adapter, Capability.EMBEDDINGS, "model")
            return await embed(lease, req)
