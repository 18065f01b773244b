"""Backends: one module per engine, each implementing adapters.base.Adapter."""
from __future__ import annotations

from adapters.base import Adapter

__all__ = ["Adapter", "create_adapter", "BACKENDS"]

BACKENDS = ("llama_cpp", "hf_transformers", "onnx_runtime", "vllm_remote", "victor_custom")


def create_adapter(record, settings=None) -> Adapter:
    """Build the adapter for a registry record. Imports lazily: torch and friends are optional."""
    backend = record.manifest.backend
    if backend == "llama_cpp":
        from adapters.llama_cpp import LlamaCppAdapter

        return LlamaCppAdapter(record, threads=getattr(settings, "threads", None))
    from server.errors import CapabilityNotSupported

    raise CapabilityNotSupported(
        f"Model `{record.id}` uses backend `{backend}`, which this server build cannot run yet.",
        param="model",
    )
