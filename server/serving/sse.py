"""Server-sent events as OpenAI streams them: `data: <json>\\n\\n`, in-band errors, `[DONE]`."""
from __future__ import annotations

import logging

import msgspec

from server.errors import OpenAIError
from server.protocol.errors import ErrorBody, ErrorResponse

__all__ = ["event", "error_event", "DONE", "SSE_HEADERS"]

log = logging.getLogger("omniloader.sse")

_encode = msgspec.json.Encoder().encode
DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(payload: object) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


def error_event(exc: BaseException) -> bytes:
    """An error after the first byte was sent: it travels in the stream itself."""
    if isinstance(exc, OpenAIError):
        return event(exc.body())
    log.error("error during stream", exc_info=exc)
    return event(ErrorResponse(ErrorBody("The server had an error while streaming the response.",
                                         "server_error", None, "internal_error")))
