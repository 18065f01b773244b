"""Typed errors and the exception handlers that turn every failure into the OpenAI envelope.

Engines raise adapters.errors (no HTTP status); ENGINE_ERRORS is the one table that maps them to
OpenAI errors, and `from_engine` names the `param` from the engine's hint in the caller's words."""
from __future__ import annotations

import logging
import re

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from adapters import errors as engine
from server.protocol.errors import ErrorBody, ErrorResponse
from server.protocol.models import Rejection

__all__ = [
    "OpenAIError",
    "InvalidRequestError",
    "ContextLengthExceeded",
    "CapabilityNotSupported",
    "ModelNotFound",
    "AuthenticationError",
    "ModelLoadError",
    "ModelHashMismatch",
    "InsufficientMemory",
    "QueueFull",
    "ClientGone",
    "BackendUnavailable",
    "BackendTimeout",
    "RemoteError",
    "RunnerError",
    "NoModelQualifies",
    "ResponseNotFound",
    "JobNotFound",
    "LabUnavailable",
    "ExportFailed",
    "ENGINE_ERRORS",
    "DEFAULT_PARAMS",
    "from_engine",
    "decode_body",
    "error_response",
    "exception_handlers",
]

log = logging.getLogger("omniloader.errors")


class OpenAIError(Exception):
    """An error with an HTTP status and the OpenAI error fields."""

    status_code = 500
    type = "server_error"
    code: str | None = None
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> ErrorResponse:
        return ErrorResponse(ErrorBody(self.message, self.type, self.param, self.code))


class InvalidRequestError(OpenAIError):
    status_code = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequestError):
    code = "context_length_exceeded"


class CapabilityNotSupported(InvalidRequestError):
    code = "capability_not_supported"


class ModelNotFound(OpenAIError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"The model `{name}` does not exist.", param="model")


class AuthenticationError(OpenAIError):
    status_code = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelLoadError(OpenAIError):
    status_code = 500
    type = "server_error"
    code = "model_load_failed"


class ModelHashMismatch(OpenAIError):
    """A locked model's files no longer hash to the pinned sha256: refuse to load them."""

    status_code = 409
    type = "invalid_request_error"
    code = "model_hash_mismatch"

    def __init__(self, model_id: str, expected: str, actual: str) -> None:
        super().__init__(f"Model `{model_id}` is locked to sha256 {expected[:12]}… but its files now hash to "
                         f"{actual[:12]}…; refusing to load it (re-verify, then `omniloader models lock "
                         f"{model_id} --set-expected` if the change is intended).", param="model")
        self.model_id = model_id
        self.expected = expected
        self.actual = actual


class InsufficientMemory(OpenAIError):
    status_code = 507
    type = "server_error"
    code = "insufficient_memory"


class QueueFull(OpenAIError):
    """Too many requests waiting for one model: 503 with Retry-After, as a load balancer expects."""

    status_code = 503
    type = "server_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after)}


class ClientGone(OpenAIError):
    status_code = 499  # nginx's "client closed request": nobody reads it, but the logs say why
    type = "invalid_request_error"
    code = "client_closed_request"


class BackendUnavailable(OpenAIError):
    """The model lives behind another server (or process) that could not be reached or failed."""

    status_code = 502
    type = "server_error"
    code = "backend_unavailable"


class BackendTimeout(OpenAIError):
    """The model's remote server or runner process did not answer in its configured time."""

    status_code = 504
    type = "server_error"
    code = "backend_timeout"


class RemoteError(OpenAIError):
    """The remote refused the request (4xx): the same status and its message, type and code."""

    def __init__(self, status: int, message: str, *, type_: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.status_code = status
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")


class RunnerError(OpenAIError):
    """User code in runner.py failed: raised, crashed, or ran out of memory (`code` says which)."""

    status_code = 500
    type = "server_error"
    code = "runner_error"


class NoModelQualifies(ModelNotFound):
    """404 model_not_found whose message says why every candidate was turned down."""

    def __init__(self, query: str, detail: str, rejected: list[Rejection]) -> None:
        OpenAIError.__init__(self, f"No model qualifies for `{query}`: {detail}", param="model")
        self.rejected = rejected


class ResponseNotFound(OpenAIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"

    def __init__(self, response_id: str, param: str | None = None) -> None:
        super().__init__(f"Response with id '{response_id}' not found.", param=param)


class JobNotFound(OpenAIError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class LabUnavailable(OpenAIError):
    status_code = 501
    type = "server_error"
    code = "lab_unavailable"


class ExportFailed(OpenAIError):
    """The model could not be converted (the CLI prints the message and exits 1)."""


# Engine error class -> the OpenAI error it becomes (the most specific class of an error wins).
ENGINE_ERRORS: dict[type[engine.EngineError], type[OpenAIError]] = {
    engine.ContextTooLong: ContextLengthExceeded,
    engine.InvalidInput: InvalidRequestError,
    engine.Unsupported: CapabilityNotSupported,
    engine.LoadFailed: ModelLoadError,
    engine.BackendUnreachable: BackendUnavailable,
    engine.BackendTimedOut: BackendTimeout,
    engine.EngineError: OpenAIError,
}
# An engine hint's wire name where the caller gives none (the chat and completions names).
DEFAULT_PARAMS = {engine.HINT_SCHEMA: "response_format"}


def from_engine(exc: engine.EngineError, params: dict[str, str] | None = None) -> OpenAIError:
    """The OpenAI error for an engine error; `params` maps engine hints to the caller's field names."""
    if isinstance(exc, engine.RemoteRejected):
        return RemoteError(exc.status, exc.message, type_=exc.type, param=exc.param, code=exc.code)
    if isinstance(exc, engine.RunnerFailed):
        return RunnerError(exc.message, code=exc.code)
    cls = next(ENGINE_ERRORS[k] for k in type(exc).__mro__ if k in ENGINE_ERRORS)
    hint = exc.hint
    param = None if hint is None else (params or {}).get(hint, DEFAULT_PARAMS.get(hint, hint))
    return cls(exc.message, param=param)


_MSGSPEC_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


def decode_body(body: bytes, type_: type) -> object:
    """Decode a JSON body into a protocol Struct; bad JSON or types -> 400 naming the field."""
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _MSGSPEC_PATH.search(text)
        # msgspec writes a dict value's path as `field[...]`: the field is the param.
        param = match.group("path").replace("[...]", "") if match and match.group("path") else None
        if text.startswith("Object missing required field"):
            field = text.split("`")[1]
            param = f"{param}.{field}" if param else field
        raise InvalidRequestError(f"Invalid request body: {text}", param=param) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"Malformed JSON body: {exc}") from None


def error_response(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> Response:
    return Response(ErrorResponse(ErrorBody(message, type_, param, code)), status_code=status)


def _openai_error(_: Request, exc: OpenAIError) -> Response:
    return Response(exc.body(), status_code=exc.status_code, headers=exc.headers)


def _engine_error(request: Request, exc: engine.EngineError) -> Response:
    return _openai_error(request, from_engine(exc))


def _http_error(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    type_ = "invalid_request_error" if 400 <= status < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    message = exc.detail
    if isinstance(exc, ValidationException) and exc.extra:
        message = f"{exc.detail}: {exc.extra}"
    return Response(ErrorResponse(ErrorBody(str(message), type_, None, code)), status_code=status,
                    headers=getattr(exc, "headers", None))


def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "The server had an error while processing your request.", "server_error",
                          "internal_error")


exception_handlers = {
    OpenAIError: _openai_error,
    engine.EngineError: _engine_error,
    HTTPException: _http_error,
    Exception: _unexpected_error,
}
