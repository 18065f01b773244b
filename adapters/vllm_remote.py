"""Any remote OpenAI-compatible server (vLLM, llama.cpp's server, another OmniLoader) as a model.

Manifest: `backend: vllm_remote`, `source: http://host:port/v1` (the base URL), and `params`:
`api_key` or `api_key_env` (the name of an environment variable holding it), `served_model_id`
(the remote's name for the model; default the manifest id), `timeout` (seconds to connect and
between two reads; default 60). The model costs no local memory.

Requests are forwarded as the client sent them: only the fields it set (or the manifest's
`defaults`) travel, never OpenAI's defaults; messages, tools, tool_choice and response_format go
through untouched and the remote applies them. Its tool calls come back as Delta.tool_calls.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import msgspec
from msgspec import UNSET

from adapters.base import (
    Adapter,
    Capability,
    Delta,
    GenerateParams,
    TokenLogprob,
    ToolCallPiece,
    TopLogprob,
    Usage,
)
from adapters.errors import BackendTimedOut, BackendUnreachable, EngineError, LoadFailed, RemoteRejected
from adapters.overlay import refuse_overlay

__all__ = ["VllmRemoteAdapter", "RemoteStatus", "remote_status", "remote_config"]

log = logging.getLogger("omniloader.vllm_remote")

DEFAULT_TIMEOUT = 60.0
# Sampling knobs sent only when the request (or the manifest's defaults) set them.
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repeat_penalty", "seed")
# Chat request fields the remote applies itself, forwarded as the client wrote them.
_CHAT_PASSTHROUGH = ("tools", "tool_choice", "parallel_tool_calls", "response_format", "user")


class RemoteStatus(msgspec.Struct):
    """Whether a remote model's server answers, and the models it lists (GET {base}/models)."""

    id: str
    url: str
    reachable: bool
    served_model_id: str
    models: list[str] = []
    error: str | None = None


def _given(value: Any) -> bool:
    return value is not None and value is not UNSET


def _as_sent(value: Any) -> Any:
    """A request Struct as the client wrote it: fields it left out (None / UNSET) stay out;
    plain dicts (JSON schemas, parameters) pass untouched."""
    if isinstance(value, msgspec.Struct):
        return {name: _as_sent(v) for name in value.__struct_fields__ if _given(v := getattr(value, name))}
    if isinstance(value, list):
        return [_as_sent(v) for v in value]
    return msgspec.to_builtins(value)


def remote_config(manifest) -> tuple[str, dict[str, str], str, float]:
    """(base URL, auth headers, served model id, timeout) from a vllm_remote manifest."""
    params = manifest.params
    base = manifest.source.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise LoadFailed(f"Model `{manifest.id}`: source `{manifest.source}` is not an http(s) URL.")
    key = params.get("api_key")
    if key is None and (env := params.get("api_key_env")):
        key = os.environ.get(env)
        if key is None:
            raise LoadFailed(f"Model `{manifest.id}`: environment variable `{env}` (params.api_key_env) "
                                 "is not set.")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = float(params.get("timeout", DEFAULT_TIMEOUT))
    return base, headers, str(params.get("served_model_id") or manifest.id), timeout


def remote_status(manifest, timeout: float = 5.0) -> RemoteStatus:
    """Ask the remote for its model list (without loading anything): reachable or why not."""
    try:
        base, headers, served, configured = remote_config(manifest)
    except EngineError as exc:
        return RemoteStatus(manifest.id, manifest.source, False, "", error=exc.message)
    try:
        response = httpx.get(base + "/models", headers=headers, timeout=min(timeout, configured))
        if response.status_code >= 400:
            return RemoteStatus(manifest.id, base, False, served, error=_error_message(response))
        data = response.json().get("data") or []
        return RemoteStatus(manifest.id, base, True, served, models=[str(m.get("id")) for m in data])
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return RemoteStatus(manifest.id, base, False, served, error=f"{type(exc).__name__}: {exc}")


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body, dict) and body.get("detail"):
            return str(body["detail"])
    except ValueError:
        pass
    return response.text.strip()[:2000] or f"HTTP {response.status_code}"


class VllmRemoteAdapter(Adapter):
    backend = "vllm_remote"
    supported = frozenset({Capability.CHAT, Capability.COMPLETION, Capability.TOOLS, Capability.JSON_SCHEMA,
                              Capability.LOGPROBS})
    handles_tools = True  # the remote applies tools and response_format; its calls stream back

    def __init__(self, record, settings=None) -> None:
        super().__init__(record, settings)
        self.base_url, self._headers, self.served_model_id, self.timeout = remote_config(self.manifest)
        self._http: httpx.Client | None = None

    # --- lifecycle -------------------------------------------------------------------------
    def load(self, progress=None) -> None:
        """Nothing to load: the connection opens with the first request (an unreachable remote
        is a 502 for that request, not a failed load)."""
        self.report_capabilities(self.supported)
        if progress is not None:
            progress(1.0)

    def unload(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def memory_estimate(self) -> int:
        return 0

    def context_length(self) -> int:
        if self.manifest.context_length:
            return self.manifest.context_length
        return super().context_length()

    def status(self) -> RemoteStatus:
        return remote_status(self.manifest, self.timeout)

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(base_url=self.base_url, headers=self._headers,
                                      timeout=httpx.Timeout(self.timeout))
        return self._http

    # --- generation ------------------------------------------------------------------------
    def generate(self, params: GenerateParams, cancel: threading.Event) -> Iterator[Delta]:
        refuse_overlay(params.overlay, self.id, self.backend)
        chat = params.messages is not None
        body = self.chat_body(params) if chat else self.completion_body(params)
        path = "/chat/completions" if chat else "/completions"
        try:
            with self._open(path, body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise self._refused(response)
                yield from self._deltas(response, chat, cancel)
        except httpx.TimeoutException as exc:
            self.unload()  # drop pooled connections: the next request starts clean
            raise BackendTimedOut(f"Model `{self.id}`: the remote server at {self.base_url} did not answer within "
                                 f"{self.timeout:g} s ({type(exc).__name__}).") from None
        except httpx.TransportError as exc:
            self.unload()
            raise BackendUnreachable(f"Model `{self.id}`: cannot reach the remote server at {self.base_url} "
                                     f"({type(exc).__name__}: {exc}).") from None
        except BackendUnreachable:
            self.unload()
            raise

    @contextmanager
    def _open(self, path: str, body: dict[str, Any]) -> Iterator[httpx.Response]:
        """POST with stream=true. A pooled keep-alive connection the remote has meanwhile dropped
        fails before any answer: that one attempt is retried once on a fresh connection."""
        try:
            response = self._client().send(self._client().build_request("POST", path, json=body), stream=True)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            self.unload()
            response = self._client().send(self._client().build_request("POST", path, json=body), stream=True)
        try:
            yield response
        finally:
            response.close()

    def chat_body(self, params: GenerateParams) -> dict[str, Any]:
        req = params.request
        body: dict[str, Any] = {"model": self.served_model_id, "stream": True,
                                "stream_options": {"include_usage": True}}
        if req is None:  # a direct caller (the Lab, a test): the params are all there is
            body["messages"] = params.messages
            return {**body, **self._sampling(params, None)}
        body["messages"] = msgspec.to_builtins(req.messages)
        body.update(self._sampling(params, req))
        for name in _CHAT_PASSTHROUGH:
            if _given(value := getattr(req, name, None)):
                body[name] = _as_sent(value)
        if getattr(req, "logprobs", None):
            body["logprobs"] = True
            if _given(getattr(req, "top_logprobs", None)):
                body["top_logprobs"] = req.top_logprobs
        return body

    def completion_body(self, params: GenerateParams) -> dict[str, Any]:
        req = params.request
        body: dict[str, Any] = {"model": self.served_model_id, "prompt": params.prompt, "stream": True,
                                "stream_options": {"include_usage": True}, **self._sampling(params, req)}
        if params.suffix is not None:
            body["suffix"] = params.suffix
        if req is not None and _given(getattr(req, "logprobs", None)):
            body["logprobs"] = req.logprobs
        elif req is None and params.logprobs:
            body["logprobs"] = params.top_logprobs
        if req is not None and _given(getattr(req, "user", None)):
            body["user"] = req.user
        return body

    def _sampling(self, params: GenerateParams, req: Any) -> dict[str, Any]:
        """The values the client (or the manifest's defaults) chose; OpenAI's defaults stay home.
        Values come from params (the manifest's defaults applied, seed+i for the i-th of n)."""
        defaults = self.manifest.defaults

        def chosen(name: str) -> bool:
            return req is None or _given(getattr(req, name, None)) or name in defaults

        out: dict[str, Any] = {name: getattr(params, name) for name in _SAMPLING if chosen(name)}
        if req is None:
            out = {k: v for k, v in out.items() if v is not None}
        if params.max_tokens is not None:
            out["max_tokens"] = params.max_tokens
        if params.stop and chosen("stop"):
            out["stop"] = params.stop
        if params.logit_bias:
            out["logit_bias"] = {str(token): bias for token, bias in params.logit_bias.items()}
        if params.ignore_eos:
            out["ignore_eos"] = True
        return out

    def _refused(self, response: httpx.Response) -> EngineError:
        message = _error_message(response)
        status = response.status_code
        if status >= 500:
            return BackendUnreachable(f"Model `{self.id}`: the remote server at {self.base_url} failed "
                                      f"(HTTP {status}): {message}")
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            error = None
        error = error if isinstance(error, dict) else {}
        return RemoteRejected(status, f"Remote server for `{self.id}`: {message}", type_=error.get("type"),
                              param=error.get("param"), code=error.get("code"))

    def _deltas(self, response: httpx.Response, chat: bool, cancel: threading.Event) -> Iterator[Delta]:
        """The remote's SSE chunks as Deltas; the last carries finish_reason and usage."""
        finish, usage, pieces, done = None, None, 0, False
        calls_seen: set[int] = set()
        for line in response.iter_lines():
            if cancel.is_set():
                return  # leaving the `with` closes the connection: the remote stops generating
            if not line.startswith("data:"):
                continue  # blank lines, `: ping` comments, `event:` names
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                raise BackendUnreachable(f"Model `{self.id}`: the remote sent a malformed event: {data[:200]}") from None
            if isinstance(chunk.get("error"), dict | str):
                error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
                raise BackendUnreachable(f"Model `{self.id}`: the remote failed mid-stream: "
                                         f"{error.get('message') or error}")
            if chunk.get("usage"):
                u = chunk["usage"]
                usage = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0))
            for choice in chunk.get("choices") or ():
                if choice.get("index", 0) != 0:
                    continue  # we always ask for one choice
                delta = _chat_delta(choice, calls_seen) if chat else _completion_delta(choice)
                if delta is not None:
                    pieces += 1
                    yield delta
                finish = choice.get("finish_reason") or finish
        if finish is None and not done:
            raise BackendUnreachable(f"Model `{self.id}`: the remote server at {self.base_url} ended the stream "
                                     "before finishing (it may have failed; see its log).")
        # Without usage from the remote (it ignores stream_options), each content chunk counts as
        # one completion token and the prompt as 0: the remote alone knows its tokenizer.
        yield Delta(finish_reason=finish or "stop", usage=usage or Usage(0, pieces))


def _chat_delta(choice: dict, calls_seen: set[int]) -> Delta | None:
    d = choice.get("delta") or {}
    text = d.get("content") or ""
    calls = []
    for tc in d.get("tool_calls") or ():
        index, fn = int(tc.get("index", 0)), tc.get("function") or {}
        first = index not in calls_seen
        calls_seen.add(index)
        # llama.cpp's server repeats id and name on every fragment: only the first one starts the call.
        calls.append(ToolCallPiece(index, id=(tc.get("id") or f"call_{uuid.uuid4().hex[:24]}") if first else None,
                                   name=(fn.get("name") or "") if first else None,
                                   arguments=fn.get("arguments") or ""))
    logprobs = _chat_logprobs(choice.get("logprobs"))
    if not (text or calls or logprobs):
        return None
    return Delta(text=text, tool_calls=calls or None, logprobs=logprobs)


def _completion_delta(choice: dict) -> Delta | None:
    text = choice.get("text") or ""
    logprobs = _completion_logprobs(choice.get("logprobs"))
    return Delta(text=text, logprobs=logprobs) if (text or logprobs) else None


def _bytes(token: str, given: Any) -> list[int]:
    return list(given) if isinstance(given, list) else list(token.encode("utf-8"))


def _chat_logprobs(block: Any) -> list[TokenLogprob] | None:
    if not isinstance(block, dict) or not block.get("content"):
        return None
    return [TokenLogprob(t["token"], t.get("logprob"), _bytes(t["token"], t.get("bytes")),
                         [TopLogprob(a["token"], a["logprob"], _bytes(a["token"], a.get("bytes")))
                          for a in t.get("top_logprobs") or ()])
            for t in block["content"]]


def _completion_logprobs(block: Any) -> list[TokenLogprob] | None:
    if not isinstance(block, dict) or not block.get("tokens"):
        return None
    tops = block.get("top_logprobs") or [None] * len(block["tokens"])
    return [TokenLogprob(token, logprob, _bytes(token, None),
                         [TopLogprob(t, lp, _bytes(t, None)) for t, lp in (top or {}).items()])
            for token, logprob, top in zip(block["tokens"], block.get("token_logprobs") or (), tops)]
