"""EngineOverlay on a torch model (hf_transformers) for one generation: forward hooks, no weight is
written. A LoRA adds scale * (x @ A.T) @ B.T to its Linear's output; a steering vector adds
scale * v to a decoder layer's output (the residual stream after that layer). `applied()` installs
the hooks and removes them when the block ends, however it ends. Component tensors are read once and
kept in a small LRU cache (by sha256) on the model's device and dtype."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager

from adapters.errors import HINT_MODEL, InvalidInput
from adapters.overlay import EngineOverlay, read_lora

__all__ = ["TorchOverlays", "decoder_layers"]


def decoder_layers(model):
    """The decoder blocks (model.model.layers for llama-family models)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise InvalidInput("This model has no `layers` list of decoder blocks to apply an aura to.", hint=HINT_MODEL)
    return layers


class TorchOverlays:
    def __init__(self, model: Callable[[], object], model_id: str, capacity: int = 8) -> None:
        self._get_model = model  # the adapter's current module (peft may swap it)
        self._id = model_id
        self.capacity = max(1, int(capacity))
        self._tensors: OrderedDict[str, object] = OrderedDict()  # sha256 -> LoRA pairs or a steering vector

    @contextmanager
    def applied(self, overlay: EngineOverlay | None):
        if overlay is None or overlay.empty:
            yield
            return
        handles = []
        try:
            model = self._get_model()
            layers = decoder_layers(model)
            for lw in overlay.loras:
                for (layer, module), (a, b) in self._lora(lw.path, lw.sha256).items():
                    if layer >= len(layers):
                        raise InvalidInput(f"Model `{self._id}`: the aura's LoRA {lw.path} adapts layer {layer}; the "
                                           f"model has {len(layers)}.", hint=HINT_MODEL)
                    linear = layers[layer].get_submodule(module)
                    if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
                        raise InvalidInput(f"Model `{self._id}`: the aura's LoRA {lw.path} does not fit layer {layer} "
                                           f"{module} ({linear.in_features} -> {linear.out_features}).", hint=HINT_MODEL)
                    handles.append(linear.register_forward_hook(_lora_hook(a, b, lw.scale)))
            for v in overlay.steering:
                if not 0 <= v.layer < len(layers):
                    raise InvalidInput(f"Model `{self._id}`: the aura's steering vector is for layer {v.layer}; the "
                                       f"model has {len(layers)}.", hint=HINT_MODEL)
                vector = self._vector(v.path, v.sha256)
                hidden = getattr(model.config, "hidden_size", vector.numel())
                if vector.numel() != hidden:
                    raise InvalidInput(f"Model `{self._id}`: the steering vector {v.path} has {vector.numel()} values; "
                                       f"this model's residual stream has {hidden}.", hint=HINT_MODEL)
                handles.append(layers[v.layer].register_forward_hook(_steer_hook(vector, v.scale)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def cached(self) -> int:
        return len(self._tensors)

    def _param(self):
        return next(self._get_model().parameters())

    def _remember(self, sha256: str, value) -> None:
        self._tensors[sha256] = value
        while len(self._tensors) > self.capacity:
            self._tensors.popitem(last=False)

    def _lora(self, path: str, sha256: str) -> dict:
        import torch

        if (pairs := self._tensors.get(sha256)) is not None:
            self._tensors.move_to_end(sha256)
            return pairs
        try:
            raw = read_lora(path)
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"Model `{self._id}`: cannot read the LoRA component {path}: {exc}",
                               hint=HINT_MODEL) from exc
        p = self._param()
        pairs = {key: (torch.as_tensor(a).to(p.device, p.dtype), torch.as_tensor(b).to(p.device, p.dtype))
                 for key, (a, b) in raw.items()}
        self._remember(sha256, pairs)
        return pairs

    def _vector(self, path: str, sha256: str):
        import torch
        from safetensors.numpy import load_file

        if (vector := self._tensors.get(sha256)) is not None:
            self._tensors.move_to_end(sha256)
            return vector
        try:
            array = load_file(path)["vector"].reshape(-1)
        except (OSError, KeyError, ValueError) as exc:
            raise InvalidInput(f"Model `{self._id}`: cannot read the steering vector {path}: {exc}",
                               hint=HINT_MODEL) from exc
        p = self._param()
        vector = torch.as_tensor(array).to(p.device, p.dtype)
        self._remember(sha256, vector)
        return vector


def _lora_hook(a, b, scale: float):
    def hook(_module, inputs, output):
        return output + scale * ((inputs[0].to(a.dtype) @ a.T) @ b.T).to(output.dtype)
    return hook


def _steer_hook(vector, scale: float):
    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            return (output[0] + scale * vector.to(output[0].dtype), *output[1:])
        return output + scale * vector.to(output.dtype)
    return hook
