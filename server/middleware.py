"""Counts every HTTP request by route, model and status for /metrics."""
from __future__ import annotations

from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware

from server.metrics import Metrics

__all__ = ["RequestMetricsMiddleware"]


class RequestMetricsMiddleware(ASGIMiddleware):
    scopes = (ScopeType.HTTP,)

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def handle(self, scope, receive, send, next_app) -> None:
        status = 500  # a response that never started counts as a server error

        async def send_and_watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await next_app(scope, receive, send_and_watch)
        finally:
            route = scope.get("path_template") or "unmatched"  # templates, not raw paths: bounded labels
            model = scope.get("state", {}).get("model", "")
            self.metrics.requests.labels(route, model, str(status)).inc()
