"""API-key guard for /v1, /api and /lab (health stays open)."""
from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from server.errors import AuthenticationError

__all__ = ["require_api_key"]


def require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    expected = connection.app.state.settings.api_key
    if not expected:
        return
    scheme, _, token = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise AuthenticationError("Incorrect or missing API key. Send `Authorization: Bearer <key>`.")
