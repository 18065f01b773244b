"""Checking components: names, the kind-specific fields and their bounds, and what a component's
file holds. Every check raises ValueError with a message that names the field at fault; callers
turn it into a 400 (a request) or a failed write (an engine's result)."""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import msgspec

from adapters.overlay import LORA_MODULES, read_lora
from server.protocol.auras import FILE_KINDS, KINDS, Component

__all__ = ["NAME", "COMPONENT_ID", "COMPONENT_FILE", "MAX_COMPONENTS", "is_name", "check_name", "new_component",
           "check_component", "check_file", "file_name"]

log = logging.getLogger("omniloader.auras")

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
COMPONENT_ID = re.compile(r"c[0-9]{1,6}")
COMPONENT_FILE = re.compile(r"c[0-9]{1,6}\.safetensors")  # the store names every file it keeps itself
MAX_COMPONENTS = 256
MAX_TEXT = 32768
MAX_BIAS = 4096
MAX_WEIGHT = 1000.0
MAX_LAYER = 4095
MAX_RANK = 4096
_FIELDS = frozenset(Component.__struct_fields__) - {"id", "sha256"}


def is_name(name: object) -> bool:
    return isinstance(name, str) and NAME.fullmatch(name) is not None


def check_name(name: object, what: str = "aura name") -> str:
    if not is_name(name):
        raise ValueError(f"`{name}` is not a valid {what}: lowercase letters, digits, `-` and `_`, starting with a "
                         "letter or digit, at most 64 characters.")
    return name


def file_name(component_id: str) -> str:
    return f"{component_id}.safetensors"


def _finite(value: Any, field: str, bound: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or abs(value) > bound:
        raise ValueError(f"`{field}` must be a finite number within ±{bound:g}, not {value!r}.")
    return float(value)


def _int(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"`{field}` must be an integer in {low}..{high}, not {value!r}.")
    return value


def new_component(data: dict[str, Any], component_id: str, where: str = "component") -> Component:
    """A Component from an engine's (or a request's) dict: known fields only (others are dropped with a
    warning), checked for its kind. `file` stays as given; the store replaces it with its own name."""
    if not isinstance(data, dict):
        raise ValueError(f"`{where}` must be an object with `kind`.")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        log.warning("%s: ignoring unknown fields %s", where, unknown)
    fields = {"weight": 1.0, **{k: v for k, v in data.items() if k in _FIELDS}}
    if fields.get("kind") not in KINDS:
        raise ValueError(f"`{where}.kind` must be one of {', '.join(KINDS)}, not {fields.get('kind')!r}.")
    try:
        component = msgspec.convert({**fields, "id": component_id}, Component)
    except msgspec.ValidationError as exc:
        raise ValueError(f"`{where}`: {exc}") from None
    return check_component(component, where)


def check_component(c: Component, where: str = "component") -> Component:
    """The fields its kind needs, within bounds (also run on every component read from aura.json)."""
    if COMPONENT_ID.fullmatch(c.id) is None:
        raise ValueError(f"`{where}.id` `{c.id}` is not a component id (c1, c2, ...).")
    _finite(c.weight, f"{where}.weight", MAX_WEIGHT)
    if c.kind == "prompt_delta":
        if not isinstance(c.text, str) or not c.text.strip() or len(c.text) > MAX_TEXT:
            raise ValueError(f"`{where}.text` must be a non-empty string of at most {MAX_TEXT} characters.")
    elif c.kind == "token_bias":
        if not c.bias or len(c.bias) > MAX_BIAS:
            raise ValueError(f"`{where}.bias` must map 1..{MAX_BIAS} token ids to biases.")
        for token, value in c.bias.items():
            if not token.isdigit() or int(token) >= 2**31:
                raise ValueError(f"`{where}.bias` key `{token}` is not a token id.")
            _finite(value, f"{where}.bias[{token}]", 100.0)
    elif c.kind == "lora":
        _int(c.rank, f"{where}.rank", 1, MAX_RANK)
        _finite(c.alpha, f"{where}.alpha", 1e6)
        if not c.modules or any(m not in LORA_MODULES for m in c.modules):
            raise ValueError(f"`{where}.modules` must list some of {', '.join(LORA_MODULES)}.")
        if not c.layers:
            raise ValueError(f"`{where}.layers` must list the layers the LoRA adapts.")
        for i, layer in enumerate(c.layers):
            _int(layer, f"{where}.layers[{i}]", 0, MAX_LAYER)
    elif c.kind == "steering":
        _int(c.layer, f"{where}.layer", 0, MAX_LAYER)
        _finite(c.coefficient, f"{where}.coefficient", 1e6)
    if c.kind in FILE_KINDS and not isinstance(c.file, str):
        raise ValueError(f"`{where}.file` is required for a {c.kind} component.")
    if c.kind not in FILE_KINDS and c.file is not None:
        raise ValueError(f"`{where}.file`: a {c.kind} component has no file.")
    return c


def check_file(c: Component, path: Path, where: str = "component") -> None:
    """The file holds what the component says: a LoRA's tensors are of its modules, layers and rank; a
    steering file holds one 1-d float `vector`."""
    try:
        if c.kind == "lora":
            pairs = read_lora(path)
            if not pairs:
                raise ValueError("no LoRA tensors")
            for (layer, module), (a, _b) in pairs.items():
                if module not in c.modules or layer not in c.layers:
                    raise ValueError(f"it adapts layer {layer} {module}, which `modules`/`layers` do not list")
                if a.shape[0] != c.rank:
                    raise ValueError(f"layer {layer} {module} has rank {a.shape[0]}, not {c.rank}")
        elif c.kind == "steering":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
            vector = tensors.get("vector")
            if vector is None or vector.ndim != 1 or vector.dtype.kind != "f" or not vector.size:
                raise ValueError("it must hold one 1-d float tensor `vector`")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a bad file
        raise ValueError(f"`{where}.file` {path.name}: {exc}") from None
