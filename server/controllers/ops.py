"""Operational endpoints: health."""
from __future__ import annotations

import msgspec
from litestar import get
from litestar.di import NamedDependency

from server.router import ModelRouter

__all__ = ["health"]


class Health(msgspec.Struct):
    status: str
    models: list[str]


@get("/health")
async def health(router: NamedDependency[ModelRouter]) -> Health:
    return Health(status="ok", models=router.resident())
