"""The OpenAI error envelope: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import msgspec

__all__ = ["ErrorBody", "ErrorResponse"]


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody
