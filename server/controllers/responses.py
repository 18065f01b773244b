"""/v1/responses: the OpenAI Responses API (create, retrieve, delete), served by the chat machinery."""
from __future__ import annotations

from pathlib import Path

from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath
from litestar.response import Stream

from server.controllers.auth import require_api_key
from server.controllers.leases import acquire, released_after
from server.controllers.openai import require_chat_capabilities
from server.errors import ResponseNotFound, decode_body
from server.protocol.responses import (
    ResponseCreateRequest,
    ResponseDeleted,
    ResponseObject,
)
from server.router import ModelRouter
from server.serving.chat_run import chat_run
from server.serving.generation import Generation, chat_params, chat_tool_mode
from server.serving.responses import (
    ResponseRun,
    chat_request,
    new_response,
    replayed_messages,
    response_object,
    response_sse,
    stored_row,
)
from server.serving.sse import SSE_HEADERS
from server.storage.responses_store import ResponseStore

__all__ = ["ResponsesController", "responses_store"]


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
    async def create(self, request: Request, router: NamedDependency[ModelRouter],
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
        lease = await acquire(router, request, chat.model, req.keep_alive)
        try:
            adapter = lease.adapter
            require_chat_capabilities(adapter, mode, params, input_param="input", format_param="text.format")
            params = chat_params(chat, adapter.manifest.defaults, mode)
            gen = Generation(lease, params, "responses")
            await gen.start()  # errors before the first token become a real HTTP status
        except BaseException:
            lease.release()
            raise

        async def save(response: ResponseObject) -> None:
            await store.save(stored_row(response, conversation))

        run = ResponseRun(new_response(req, adapter.id, params.temperature, params.top_p))
        on_done = save if req.store is not False else None
        if req.stream:
            return Stream(released_after(lease, response_sse(run, chat_run(gen, mode), on_done)),
                          media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            return Response(await response_object(run, chat_run(gen, mode), on_done))
        finally:
            lease.release()  # the model is free again; the row is already saved

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
