"""Backends: one module per engine, each implementing adapters.base.Adapter."""
from __future__ import annotations

import importlib

from adapters.base import Adapter

__all__ = ["Adapter", "create_adapter", "BACKENDS"]

# backend name -> "module:Class"; imported on first use, because torch, onnxruntime and friends
# are optional and slow to import.
BACKENDS = {
    "llama_cpp": "adapters.llama_cpp:LlamaCppAdapter",
    "hf_transformers": "adapters.hf_transformers:HFTransformersAdapter",
    "vllm_remote": "adapters.vllm_remote:VllmRemoteAdapter",
    "victor_custom": "adapters.victor_custom:VictorCustomAdapter",
    "onnx_runtime": "adapters.onnx_runtime:OnnxRuntimeAdapter",
}


def create_adapter(record, settings=None) -> Adapter:
    """The adapter for a registry record (not loaded yet)."""
    backend = record.manifest.backend
    target = BACKENDS.get(backend)
    if target is None:
        from server.errors import CapabilityNotSupported

        raise CapabilityNotSupported(
            f"Model `{record.id}` uses backend `{backend}`, which this server build cannot run yet.", param="model")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(record, settings)
