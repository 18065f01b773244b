"""Serving auras: `model: "base+a+b"` -> an AuraOverlay on the base instance, applied per request.

- prompt_delta: the rule the Lab evaluated it with (adapters.overlay.apply_prompt_delta /
  prefix_prompt_delta): for chat-style requests its text is appended to the system message (a new
  system message first when there is none); for a plain completion it is a line before the prompt.
  Weight 0 turns it off; any other weight includes it as written.
- token_bias: bias × weight, summed over the stack, clamped to ±100, merged into logit_bias with
  the request's own value winning on a shared token id.
- lora / steering: handed to the engine as GenerateParams.overlay (adapters.overlay.EngineOverlay),
  LoRA scale = weight × alpha / rank, steering scale = weight × coefficient. An aura with neither
  leaves `overlay` None: the engine runs the base model and keeps its prompt cache.

Stacks apply in order: prompt deltas joined in order, biases summed, every LoRA and vector applied."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from adapters.base import GenerateParams
from adapters.overlay import (
    DELTA_SEPARATOR,
    EngineOverlay,
    LoraWeights,
    SteeringVector,
    apply_prompt_delta,
    prefix_prompt_delta,
)
from server.lab.auras.store import AuraStore
from server.protocol.auras import Aura
from server.registry import ModelRecord
from server.runtime import Overlay

__all__ = ["AuraOverlay", "AuraResolver"]

MAX_BIAS = 100.0


class AuraOverlay(Overlay):
    def __init__(self, name: str, auras: list[Aura], paths: dict[tuple[str, str], Path]) -> None:
        """`paths`: (aura name, component id) -> the verified file of each file component."""
        self.name = name
        self.auras = auras
        texts, bias, loras, steering = [], {}, [], []
        for aura in auras:
            for c in aura.components:
                if c.kind == "prompt_delta" and c.weight != 0:
                    texts.append(c.text)
                elif c.kind == "token_bias":
                    for token, value in c.bias.items():
                        bias[int(token)] = bias.get(int(token), 0.0) + value * c.weight
                elif c.kind == "lora":
                    loras.append(LoraWeights(str(paths[aura.name, c.id]), c.sha256, c.weight * c.alpha / c.rank))
                elif c.kind == "steering":
                    steering.append(SteeringVector(str(paths[aura.name, c.id]), c.sha256, c.layer,
                                                   c.weight * c.coefficient))
        self.prompt = DELTA_SEPARATOR.join(texts)
        self.bias = {t: max(-MAX_BIAS, min(MAX_BIAS, v)) for t, v in bias.items()}
        self.engine = EngineOverlay(name, tuple(loras), tuple(steering)) if loras or steering else None

    def adjust(self, params: GenerateParams) -> GenerateParams:
        changes: dict[str, Any] = {}
        if self.prompt and params.messages is not None:
            changes["messages"] = apply_prompt_delta(params.messages, self.prompt)
            if params.request is not None and getattr(params.request, "messages", None):
                changes["request"] = _request_with_system_text(params.request, self.prompt)
        elif self.prompt and params.prompt is not None:
            changes["prompt"] = prefix_prompt_delta(params.prompt, self.prompt)
        if self.bias:
            changes["logit_bias"] = {**self.bias, **params.logit_bias}
        if self.engine is not None:
            changes["overlay"] = self.engine
        return msgspec.structs.replace(params, **changes) if changes else params


def _request_with_system_text(request, text: str):
    """The same change on the decoded request (a backend that forwards the client's request, such as
    vllm_remote, sends these messages)."""
    messages = list(request.messages)
    for i, message in enumerate(messages):
        if getattr(message, "role", None) in ("system", "developer"):
            content = message.text()
            messages[i] = msgspec.structs.replace(message, content=f"{content}{DELTA_SEPARATOR}{text}" if content
                                                  else text)
            break
    else:
        messages.insert(0, type(messages[0])(role="system", content=text))
    return msgspec.structs.replace(request, messages=messages)


class AuraResolver:
    """What ModelPool.overlays calls for `base+a+b` (on a thread: it reads and hash-checks files)."""

    def __init__(self, store: AuraStore) -> None:
        self.store = store

    def __call__(self, record: ModelRecord, overlay_name: str) -> AuraOverlay:
        model = f"{record.id}+{overlay_name}"
        auras = [self.store.verified(name, record, model=model) for name in overlay_name.split("+")]
        paths = {(a.name, c.id): self.store.component_path(a, c) for a in auras for c in a.components
                 if c.file is not None}
        return AuraOverlay(overlay_name, auras, paths)

    def listing(self) -> list[tuple[str, str, float]]:
        """(base model id, aura name, created_at) of every stored aura, for /v1/models."""
        return [(a.base, a.name, a.created_at) for a in self.store.list()]
