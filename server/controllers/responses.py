"""/v1/responses: the OpenAI Responses API (create, retrieve, delete), served by the chat machinery."""
from __future__ import annotations

from pathlib import Path

from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath

from adapters.errors import HINT_PROMPT, HINT_SCHEMA
from server.controllers.auth import require_api_key
from server.controllers.openai import require_chat_capabilities
from server.errors import ResponseNotFound, decode_body
from server.protocol.responses import (
    ResponseCreateRequest,
    ResponseDeleted,
    ResponseObject,
)
from server.runtime import Lease, ModelPool
from server.serving.chat_run import chat_run
from server.serving.generation import chat_params, chat_tool_mode
from server.serving.responses import (
    ResponseRun,
    chat_request,
    new_response,
    replayed_messages,
    response_object,
    response_sse,
    stored_row,
)
from server.serving.run import Generation, Surface, run_generation
from server.storage.responses_store import ResponseStore

__all__ = ["ResponsesController", "responses_store"]

RESPONSES = Surface("responses", {HINT_PROMPT: "input", HINT_SCHEMA: "text.format"})


def responses_store(state: State) -> ResponseStore:
    """One store per app (its lab directory), made on first use and kept in the app's state."""
    store = state.get("responses_store")
    if store is None:
        store = state["responses_store"] = ResponseStore(Path(state.settings.lab_dir) / "responses.sqlite3")
    return store


class ResponsesController(Controller):
    path = "/v1/responses"
    guards = [require_api_key]
    dependencies = {"store": Provide(responses_store, sync_to_thread=False)}

    @post("/", status_code=200)
    async def create(self, request: Request, pool: NamedDependency[ModelPool],
                     store: NamedDependency[ResponseStore]) -> Response:
        req: ResponseCreateRequest = decode_body(await request.body(), ResponseCreateRequest)
        history = []
        if req.previous_response_id is not None:
            previous = await store.get(req.previous_response_id)
            if previous is None:
                raise ResponseNotFound(req.previous_response_id, param="previous_response_id")
            history = replayed_messages(previous)
        chat, conversation = chat_request(req, history)
        mode = chat_tool_mode(chat)
        params = chat_params(chat, {}, mode)  # validates before any model is loaded
        surface = RESPONSES.naming(json_schema="tools") if mode.kind == "forced" else RESPONSES

        async def start(lease: Lease) -> tuple[ResponseRun, Generation]:
            require_chat_capabilities(lease.adapter, mode, params, input_param="input", format_param="text.format")
            full = chat_params(chat, lease.defaults, mode)
            gen = Generation(lease, full, surface)
            await gen.start()  # errors before the first token become a real HTTP status
            return ResponseRun(new_response(req, lease.name, full.temperature, full.top_p)), gen

        async def save(response: ResponseObject) -> None:
            await store.save(stored_row(response, conversation))

        on_done = save if req.store is not False else None

        def stream(started):
            run, gen = started
            return response_sse(run, chat_run(gen, mode), on_done)

        async def collect(started):
            run, gen = started
            return await response_object(run, chat_run(gen, mode), on_done)  # saved before the model is free

        return await run_generation(pool, request, model=chat.model, keep_alive=req.keep_alive, surface=surface,
                                    start=start, stream=stream if req.stream else None, collect=collect)

    @get("/{response_id:str}")
    async def retrieve(self, response_id: FromPath[str], store: NamedDependency[ResponseStore]) -> Response:
        row = await store.get(response_id)
        if row is None:
            raise ResponseNotFound(response_id)
        return Response(row.response.encode(), media_type="application/json")

    @delete("/{response_id:str}", status_code=200)
    async def delete_response(self, response_id: FromPath[str],
                              store: NamedDependency[ResponseStore]) -> ResponseDeleted:
        if not await store.delete(response_id):
            raise ResponseNotFound(response_id)
        return ResponseDeleted(id=response_id)
