"""EngineOverlay on a llama.cpp context: LoRA adapters and a control vector switched per request on
the loaded model, without reloading it.

- LoRA: each component's safetensors becomes a GGUF adapter once (adapters/gguf_lora.py, cached
  beside the component), loaded with llama_adapter_lora_init and kept in an LRU cache of `capacity`
  adapters (evicted ones are freed with llama_adapter_lora_free, never while set on the context).
  A request sets its adapters and scales with llama_set_adapters_lora; a request without LoRA sets
  the empty list.
- Steering: llama.cpp adds control vector row il to the output of layer il, for il in
  [il_start, il_end]; the data starts at layer 1 (row for layer L at offset (L-1) * n_embd), so a
  vector after layer 0 cannot be applied here (a 400). NULL data clears it.

Only changes reach llama.cpp: a request with the same overlay as the previous one (or none after
none) costs a tuple comparison — changing either forces llama.cpp to rebuild its compute graph.
Everything runs on the model's worker thread, one request at a time."""
from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict

import numpy as np

from adapters.errors import HINT_MODEL, InvalidInput
from adapters.gguf_lora import GGUFLayout, adapter_scale, ensure_gguf_lora
from adapters.overlay import EngineOverlay, SteeringVector

__all__ = ["DEFAULT_CACHE", "LlamaOverlays"]

log = logging.getLogger("omniloader.llama_cpp")

DEFAULT_CACHE = 8  # loaded LoRA adapters kept per model instance


class LlamaOverlays:
    def __init__(self, llm, model_id: str, capacity: int = DEFAULT_CACHE) -> None:
        self._llm = llm
        self._id = model_id
        self.capacity = max(1, int(capacity))
        self.layout = GGUFLayout.from_metadata(llm.metadata)
        self._adapters: OrderedDict[str, tuple[object, object]] = OrderedDict()  # sha256 -> (ptr, LoraFile)
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()  # sha256 -> float32 [n_embd]
        self._loras_set: tuple = ()  # (sha256, scale) pairs set on the context now
        self._cvec_set: tuple = ()  # (sha256, layer, scale) applied now

    # --- what a request asks for ------------------------------------------------------------
    def apply(self, overlay: EngineOverlay | None) -> None:
        """Make the context compute `overlay` (None or empty: the base model)."""
        loras = _merged((lw.sha256, lw.scale) for lw in overlay.loras) if overlay else ()
        steering = tuple((v.sha256, v.layer, v.scale) for v in overlay.steering) if overlay else ()
        if loras != self._loras_set:
            self._set_loras(overlay, loras)
        if steering != self._cvec_set:
            self._set_cvec(overlay.steering if overlay else ())

    def cached(self) -> int:
        """How many LoRA adapters are loaded (for tests and /api/ps-like introspection)."""
        return len(self._adapters)

    def close(self) -> None:
        """Free every adapter: call before the model is freed."""
        import llama_cpp

        if self._loras_set:
            llama_cpp.llama_set_adapters_lora(self._llm._ctx.ctx, None, 0, None)
        self._loras_set = ()
        for ptr, _file in self._adapters.values():
            llama_cpp.llama_adapter_lora_free(ptr)
        self._adapters.clear()
        self._vectors.clear()

    # --- LoRA -------------------------------------------------------------------------------
    def _set_loras(self, overlay: EngineOverlay | None, loras: tuple) -> None:
        import llama_cpp

        paths = {lw.sha256: lw.path for lw in overlay.loras} if overlay else {}
        loaded = [(self._adapter(sha, paths[sha]), scale) for sha, scale in loras]
        n = len(loaded)
        array = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[p for (p, _f), _s in loaded])
        scales = (ctypes.c_float * max(n, 1))(*[adapter_scale(s, f) for (_p, f), s in loaded])
        if llama_cpp.llama_set_adapters_lora(self._llm._ctx.ctx, array if n else None, n, scales if n else None):
            raise InvalidInput(f"Model `{self._id}`: llama.cpp refused the aura's LoRA adapters.", hint=HINT_MODEL)
        self._loras_set = loras
        self._evict(keep={sha for sha, _s in loras})

    def _adapter(self, sha256: str, path: str) -> tuple[object, object]:
        import llama_cpp

        if sha256 in self._adapters:
            self._adapters.move_to_end(sha256)
            return self._adapters[sha256]
        try:
            lora_file = ensure_gguf_lora(path, sha256, self.layout)
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"Model `{self._id}`: the LoRA component {path} cannot be converted for llama.cpp: "
                               f"{exc}", hint=HINT_MODEL) from exc
        ptr = llama_cpp.llama_adapter_lora_init(self._llm._model.model, str(lora_file.path).encode())
        if not ptr:
            raise InvalidInput(f"Model `{self._id}`: llama.cpp cannot load the LoRA component {path} (a module, layer "
                               "or shape this model does not have?).", hint=HINT_MODEL)
        self._adapters[sha256] = (ptr, lora_file)
        log.info("%s: loaded LoRA %s (%d cached)", self._id, sha256[:12], len(self._adapters))
        return ptr, lora_file

    def _evict(self, keep: set[str]) -> None:
        """Free least recently used adapters beyond capacity (never one set on the context now)."""
        import llama_cpp

        for sha in list(self._adapters):
            if len(self._adapters) <= self.capacity:
                break
            if sha in keep:
                continue
            ptr, _file = self._adapters.pop(sha)
            llama_cpp.llama_adapter_lora_free(ptr)
            log.info("%s: freed LoRA %s", self._id, sha[:12])

    # --- steering ---------------------------------------------------------------------------
    def _set_cvec(self, steering: tuple[SteeringVector, ...]) -> None:
        import llama_cpp

        ctx = self._llm._ctx.ctx
        if not steering:
            llama_cpp.llama_set_adapter_cvec(ctx, None, 0, self.layout.n_embd, -1, -1)
            self._cvec_set = ()
            return
        n_embd, n_layer = self.layout.n_embd, self.layout.n_layer
        for v in steering:
            if v.layer < 1 or v.layer >= n_layer:
                where = "after layer 0 cannot be applied by llama.cpp (its control vectors start at layer 1)" \
                    if v.layer == 0 else f"is past the model's {n_layer} layers"
                raise InvalidInput(f"Model `{self._id}`: the aura's steering vector at layer {v.layer} {where}.",
                                   hint=HINT_MODEL)
        top = max(v.layer for v in steering)
        data = np.zeros((top, n_embd), dtype=np.float32)  # row L-1 is layer L
        for v in steering:
            data[v.layer - 1] += v.scale * self._vector(v)
        flat = np.ascontiguousarray(data.reshape(-1))
        start = min(v.layer for v in steering)
        pointer = flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        if llama_cpp.llama_set_adapter_cvec(ctx, pointer, flat.size, n_embd, start, top):
            raise InvalidInput(f"Model `{self._id}`: llama.cpp refused the aura's steering vector.", hint=HINT_MODEL)
        self._cvec_set = tuple((v.sha256, v.layer, v.scale) for v in steering)

    def _vector(self, v: SteeringVector) -> np.ndarray:
        from safetensors.numpy import load_file

        vector = self._vectors.get(v.sha256)
        if vector is None:
            try:
                vector = np.asarray(load_file(v.path)["vector"], dtype=np.float32).reshape(-1)
            except (OSError, KeyError, ValueError) as exc:
                raise InvalidInput(f"Model `{self._id}`: cannot read the steering vector {v.path}: {exc}",
                                   hint=HINT_MODEL) from exc
            if vector.size != self.layout.n_embd:
                raise InvalidInput(f"Model `{self._id}`: the steering vector {v.path} has {vector.size} values; this "
                                   f"model's residual stream has {self.layout.n_embd}.", hint=HINT_MODEL)
            self._vectors[v.sha256] = vector
            while len(self._vectors) > self.capacity:
                self._vectors.popitem(last=False)
        else:
            self._vectors.move_to_end(v.sha256)
        return vector


def _merged(pairs) -> tuple:
    """(sha256, scale) pairs with one entry per adapter (a stack that names one twice adds its scales)."""
    out: dict[str, float] = {}
    for sha, scale in pairs:
        out[sha] = out.get(sha, 0.0) + scale
    return tuple(out.items())
