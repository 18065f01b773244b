"""Model listings: OpenAI's /v1/models and OmniLoader's richer /api/models; which model a name or
role selects (/api/models/select); a model load's progress events."""
from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["OpenAIModel", "OpenAIModelList", "ModelInfo", "ModelInfoList", "ModelState", "Rejection", "SelectionResult",
           "LoadProgress"]


class OpenAIModel(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "omniloader"
    object: Literal["model"] = "model"


class OpenAIModelList(msgspec.Struct):
    data: list[OpenAIModel]
    object: Literal["list"] = "list"


class ModelInfo(msgspec.Struct):
    id: str
    backend: str | None
    source: str | None
    origin: str
    state: str
    aliases: list[str] = []
    roles: list[str] = []
    capabilities: list[str] = []
    context_length: int | None = None
    manifest_path: str | None = None
    error: str | None = None


class ModelInfoList(msgspec.Struct):
    data: list[ModelInfo]
    object: Literal["list"] = "list"


class ModelState(msgspec.Struct):
    id: str
    state: str


class Rejection(msgspec.Struct):
    id: str
    reason: str


class SelectionResult(msgspec.Struct):
    """GET /api/models/select: the chosen model id, why, and who was passed over and why."""
    model: str
    reason: str
    rejected: list[Rejection] = []


class LoadProgress(msgspec.Struct):
    """One SSE event of POST /api/models/{id}/load?stream=true."""
    model: str
    status: str  # "loading" | "loaded"
    progress: float
    seconds: float
