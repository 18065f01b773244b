"""Backends: one module per engine, each implementing adapters.base.Adapter.

`backends()` is the one table of backend name -> "module:Class": the five built in, plus every
installed package's `omniloader.adapters` entry points (a plugin backend needs no change here):

    [project.entry-points."omniloader.adapters"]
    my_engine = "my_package.adapter:MyEngineAdapter"
"""
from __future__ import annotations

import functools
import importlib
import logging
from importlib.metadata import entry_points

from adapters.base import Adapter
from adapters.errors import HINT_MODEL, LoadFailed, Unsupported

__all__ = ["Adapter", "BUILTIN_BACKENDS", "ENTRY_POINT_GROUP", "adapter_class", "backends", "create_adapter"]

log = logging.getLogger("omniloader.adapters")

ENTRY_POINT_GROUP = "omniloader.adapters"
# Imported on first use: torch, onnxruntime and friends are optional and slow to import.
BUILTIN_BACKENDS = {
    "llama_cpp": "adapters.llama_cpp:LlamaCppAdapter",
    "hf_transformers": "adapters.hf_transformers:HFTransformersAdapter",
    "vllm_remote": "adapters.vllm_remote:VllmRemoteAdapter",
    "victor_custom": "adapters.victor_custom:VictorCustomAdapter",
    "onnx_runtime": "adapters.onnx_runtime:OnnxRuntimeAdapter",
}


@functools.cache
def backends() -> dict[str, str]:
    """Every backend this server can run: the built-in ones, then plugins (a plugin cannot replace
    a built-in name). Read once per process; a newly installed plugin needs a restart."""
    table = dict(BUILTIN_BACKENDS)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in table:
            log.warning("plugin backend %s (%s) ignored: the name is taken by %s", ep.name, ep.value, table[ep.name])
            continue
        table[ep.name] = ep.value
    return table


def adapter_class(backend: str) -> type[Adapter]:
    """The adapter class of a backend (imports its module). Unsupported for an unknown backend,
    LoadFailed when its module cannot be imported."""
    target = backends().get(backend)
    if target is None:
        raise Unsupported(f"Backend `{backend}` is not one this server can run (known: "
                          f"{', '.join(sorted(backends()))}).", hint=HINT_MODEL)
    module, _, name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise LoadFailed(f"Backend `{backend}` ({target}) cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Adapter)):
        raise LoadFailed(f"Backend `{backend}` ({target}) is not an adapters.base.Adapter subclass.")
    return cls


def create_adapter(record, settings=None) -> Adapter:
    """The adapter for a registry record (not loaded yet)."""
    return adapter_class(record.manifest.backend)(record, settings)
