"""Wire types of the Lab's correction queue (/lab/queue)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

__all__ = ["CorrectionRequest", "Correction", "CorrectionList", "CorrectionDeleted"]

Text = Annotated[str, msgspec.Meta(max_length=32768)]


class CorrectionRequest(msgspec.Struct, kw_only=True):
    """A better answer for a prompt: `prompt` or chat `messages`, or `completion_id` naming a recent
    chat completion whose conversation and answer become `messages` and `bad`."""

    model: str
    good: Text
    prompt: Text | None = None
    messages: Annotated[list[dict[str, Any]], msgspec.Meta(max_length=256)] | None = None
    bad: Text | None = None
    completion_id: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class Correction(msgspec.Struct, kw_only=True, omit_defaults=False):
    id: str
    model: str
    prompt: str | None
    messages: list[dict[str, Any]] | None
    good: str
    bad: str | None
    completion_id: str | None
    created_at: float
    status: str  # queued | applied
    applied_by: str | None = None  # the training job that used it
    object: Literal["lab.correction"] = "lab.correction"


class CorrectionList(msgspec.Struct):
    data: list[Correction]
    object: Literal["list"] = "list"


class CorrectionDeleted(msgspec.Struct):
    id: str
    deleted: bool = True
    object: Literal["lab.correction.deleted"] = "lab.correction.deleted"
