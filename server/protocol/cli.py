"""What `omniloader models list|show --json` prints beyond the registry state (protocol.integrity)."""
from __future__ import annotations

import msgspec

from server.protocol.integrity import ModelState

__all__ = ["GGUFInfo", "ModelListing"]


class GGUFInfo(msgspec.Struct, kw_only=True):
    architecture: str | None
    context_length: int | None
    quantization: str | None  # general.file_type by name (Q4_1, Q8_0, F16, ...)
    chat_template: bool
    tensor_count: int
    file_size: int


class ModelListing(msgspec.Struct, kw_only=True):
    id: str
    origin: str
    default: bool
    backend: str | None = None
    source: str | None = None
    aliases: list[str] = []
    roles: list[str] = []
    capabilities: list[str] = []
    context_length: int | None = None
    manifest_path: str | None = None
    error: str | None = None
    state: ModelState | None = None
