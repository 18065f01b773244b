"""Wire types of /lab/skillpacks."""
from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["ExportRequest", "Skillpack", "SkillpackList"]


class ExportRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    aura: str


class Skillpack(msgspec.Struct, kw_only=True):
    file: str  # under <lab dir>/skillpacks/
    url: str  # GET it to download the zip
    bytes: int
    sha256: str
    manifest: dict[str, Any] | None = None  # skillpack.json (on export)
    object: Literal["lab.skillpack"] = "lab.skillpack"


class SkillpackList(msgspec.Struct):
    data: list[Skillpack]
    object: Literal["list"] = "list"
