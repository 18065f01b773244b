"""Auras: the stored form (`lab/auras/<name>/aura.json`) and the wire form of /lab/auras (the same
fields, plus `object` and the `model` name to request it by)."""
from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["Component", "Aura", "AuraObject", "AuraList", "AuraDeleted", "ComposeRequest", "KINDS", "FILE_KINDS"]

KINDS = ("prompt_delta", "token_bias", "lora", "steering")
FILE_KINDS = ("lora", "steering")  # components with a safetensors file beside aura.json


class Component(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One piece of an aura; which fields are set depends on `kind` (teach-design.md)."""

    id: str  # c1, c2, ... unique in its aura
    kind: Literal["prompt_delta", "token_bias", "lora", "steering"]
    weight: float  # always written (1.0 unless the engine or the request chose another)
    text: str | None = None  # prompt_delta
    bias: dict[str, float] | None = None  # token_bias: {"token id": logit bias}
    file: str | None = None  # lora, steering: the file beside aura.json
    sha256: str | None = None  # of that file
    rank: int | None = None  # lora
    alpha: float | None = None  # lora
    modules: list[str] | None = None  # lora: adapters.overlay.LORA_MODULES
    layers: list[int] | None = None  # lora
    layer: int | None = None  # steering: after this decoder layer (0-based)
    coefficient: float | None = None  # steering
    source_job: str | None = None


class Aura(msgspec.Struct, kw_only=True):
    name: str
    base: str  # the model id it was made on
    base_sha256: str | None  # aggregate sha256 of the base model's files (None: a model without local files)
    created_at: float
    updated_at: float
    components: list[Component] = []
    history: list[dict[str, Any]] = []


class AuraObject(msgspec.Struct, kw_only=True):
    name: str
    model: str  # what a request names to be served with it: `<base>+<name>`
    base: str
    base_sha256: str | None
    created_at: float
    updated_at: float
    components: list[Component]
    history: list[dict[str, Any]]
    object: Literal["lab.aura"] = "lab.aura"

    @classmethod
    def of(cls, aura: Aura) -> AuraObject:
        return cls(name=aura.name, model=f"{aura.base}+{aura.name}", base=aura.base, base_sha256=aura.base_sha256,
                   created_at=aura.created_at, updated_at=aura.updated_at, components=aura.components,
                   history=aura.history)


class AuraList(msgspec.Struct):
    data: list[AuraObject]
    object: Literal["list"] = "list"


class AuraDeleted(msgspec.Struct):
    name: str
    deleted: bool = True
    object: Literal["lab.aura.deleted"] = "lab.aura.deleted"


class ComposeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /lab/auras: a new aura from existing auras' components (`auras`: all of each, in order;
    `components`: [{aura, id, weight?}] one by one) and/or new prompt_delta / token_bias components
    given inline ({kind, text | bias, weight?}; they need `base` unless a named aura gives it)."""

    name: str
    base: str | None = None
    auras: list[str] = []
    components: list[dict[str, Any]] = []
