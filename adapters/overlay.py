"""What an engine applies per request on top of a loaded model without reloading it, and the file
formats of the weight-space pieces the Lab makes (the contract between lab_engines, which write
them, the server's aura store, which keeps them, and the adapters, which apply them).

An aura (server/lab/auras) is a named stack of components. Two kinds act on the request and are
applied by the server before the engine sees it (prompt_delta: a system-prompt addition;
token_bias: logit biases merged into GenerateParams.logit_bias). Two act inside the model and are
handed to the engine as an EngineOverlay on GenerateParams.overlay:

- LoRA (`lora`): a safetensors file of low-rank deltas in the model's own (Hugging Face) module
  names, `layers.{i}.{module}.lora_A` [rank, in] and `layers.{i}.{module}.lora_B` [out, rank]
  (float32), where module is one of LORA_MODULES. The delta added to that Linear's weight is
  scale * (B @ A), scale = LoraWeights.scale (the component's weight times alpha / rank, folded in
  by whoever builds the overlay). A ROME rank-1 edit is a rank-1 LoRA (B = the value change, A = the
  key direction). Metadata (strings): "rank", "alpha", "base_sha256".
- Steering (`steering`): a safetensors file with one float32 tensor "vector" [d_model], added to
  the residual stream after decoder layer `layer` (0-based; lab_engines' "resid" site) at every
  position, times SteeringVector.scale. Metadata: "layer", "base_sha256".

Engines apply an overlay for exactly one generation and leave the model as it was: a request
without an overlay is the base model, byte for byte. `key` identifies an overlay's content (for
caches, and for a KV cache that must not be reused across different overlays)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import msgspec

__all__ = ["DELTA_SEPARATOR", "apply_prompt_delta", "prefix_prompt_delta", "LORA_MODULES", "LoraWeights", "SteeringVector", "EngineOverlay", "read_lora", "lora_tensor_name",
           "file_sha256", "refuse_overlay"]

# Hugging Face llama-family Linear modules a LoRA may target (relative to model.model.layers[i]).
LORA_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class LoraWeights(msgspec.Struct, frozen=True):
    path: str  # the component's safetensors file
    sha256: str  # of that file: the identity caches use
    scale: float  # multiplies B @ A (weight * alpha / rank)


class SteeringVector(msgspec.Struct, frozen=True):
    path: str
    sha256: str
    layer: int
    scale: float  # multiplies the vector (weight * coefficient)


class EngineOverlay(msgspec.Struct, frozen=True):
    name: str  # what the request called it (`capital-fix`, `a+b`)
    loras: tuple[LoraWeights, ...] = ()
    steering: tuple[SteeringVector, ...] = ()

    @property
    def key(self) -> str:
        """Content identity: equal keys apply the same change to the model."""
        parts = [f"l:{w.sha256}:{w.scale!r}" for w in self.loras] + [
            f"s:{v.sha256}:{v.layer}:{v.scale!r}" for v in self.steering]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    @property
    def empty(self) -> bool:
        return not self.loras and not self.steering


def lora_tensor_name(layer: int, module: str, part: str) -> str:
    """`layers.12.mlp.down_proj.lora_A` (part is "lora_A" or "lora_B")."""
    if module not in LORA_MODULES:
        raise ValueError(f"LoRA module `{module}` is not one of {LORA_MODULES}")
    return f"layers.{layer}.{module}.{part}"


def read_lora(path: str | Path) -> dict[tuple[int, str], tuple["object", "object"]]:
    """{(layer, module): (A [rank, in], B [out, rank])} as float32 numpy arrays."""
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    pairs: dict[tuple[int, str], dict[str, object]] = {}
    for name, array in tensors.items():
        prefix, _, part = name.rpartition(".")
        _layers, layer, module = prefix.split(".", 2)
        if _layers != "layers" or module not in LORA_MODULES or part not in ("lora_A", "lora_B"):
            raise ValueError(f"{path}: unexpected tensor `{name}` in a LoRA component")
        pairs.setdefault((int(layer), module), {})[part] = array
    out = {}
    for key, parts in pairs.items():
        if set(parts) != {"lora_A", "lora_B"}:
            raise ValueError(f"{path}: layer {key[0]} {key[1]} lacks lora_A or lora_B")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"{path}: layer {key[0]} {key[1]}: A is {a.shape}, B is {b.shape}")
        out[key] = (a, b)
    return out


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def refuse_overlay(overlay: EngineOverlay | None, model_id: str, backend: str) -> None:
    """For backends that cannot change the model inside (onnx_runtime, remote and custom runners):
    a 400 naming the model when a request carries LoRA or steering components."""
    if overlay is not None and not overlay.empty:
        from adapters.errors import HINT_MODEL, Unsupported

        raise Unsupported(f"Model `{model_id}` (backend {backend}) cannot apply the LoRA or steering components of "
                          f"`{overlay.name}`; only prompt_delta and token_bias components work on this backend.",
                          hint=HINT_MODEL)


# A prompt_delta component's one rule, for the server serving an aura and the Lab evaluating one.
DELTA_SEPARATOR = "\n"


def apply_prompt_delta(messages: list[dict], text: str) -> list[dict]:
    """A conversation with `text` appended to its system message (a new first system message when there
    is none, which replaces a chat template's default system prompt)."""
    out = [dict(m) for m in messages]
    if not text:
        return out
    for message in out:
        if message.get("role") in ("system", "developer"):
            content = message.get("content") or ""
            message["content"] = f"{content}{DELTA_SEPARATOR}{text}" if content else text
            return out
    return [{"role": "system", "content": text}, *out]


def prefix_prompt_delta(prompt: str, text: str) -> str:
    """A raw completion prompt with `text` on a line before it."""
    return f"{text}{DELTA_SEPARATOR}{prompt}" if text else prompt
