"""The Lab's own torch copies of models, checked out of the model pool.

The Lab never works on the instance that serves chat: a job checks out a private copy (purpose
`lab`) loaded through the hf_transformers adapter (a GGUF such as the default is dequantized into
torch by transformers), so chat requests to the same model keep being answered while a job runs,
and hooks or gradients never touch a live generation. The pool owns the copies: it loads them
under its one load lock after the integrity check every load gets, counts them in its one memory
budget, keeps idle ones for the next job (up to --lab-max-copies) and frees them when a load
needs room."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from adapters.errors import HINT_MODEL, Unsupported
from server.registry import ModelRecord, Registry
from server.runtime import LAB, Lease, ModelPool

__all__ = ["LabCopy", "LabModels", "lab_record"]

TORCH_BACKENDS = ("hf_transformers", "llama_cpp")


def lab_record(record: ModelRecord) -> ModelRecord:
    """The record the Lab loads for a served model: itself for hf_transformers, the same GGUF through
    transformers for llama_cpp; other backends have no torch weights to look into."""
    manifest = record.manifest
    if manifest is None or manifest.backend not in TORCH_BACKENDS:
        backend = manifest.backend if manifest else "none"
        raise Unsupported(
            f"Model `{record.id}` (backend {backend}) has no torch weights the Lab can work on: the Lab needs an "
            f"hf_transformers or GGUF (llama_cpp) model.", hint=HINT_MODEL)
    if manifest.backend == "hf_transformers":
        return record
    lab_manifest = msgspec.structs.replace(manifest, backend="hf_transformers", params={})
    return msgspec.structs.replace(record, manifest=lab_manifest)


@dataclass
class LabCopy:
    """A job's hold on its copy: the pool lease and the engines' view of the torch module."""

    model_id: str
    lease: Lease
    view: object  # lab_engines.model_access.ModelView

    @property
    def adapter(self):
        return self.lease.adapter


class LabModels:
    def __init__(self, registry: Registry, pool: ModelPool) -> None:
        self.registry = registry
        self.pool = pool

    def checkout(self, model_id: str, progress: Callable[[float], None] | None = None) -> LabCopy:
        """An idle copy of model_id, or a freshly loaded one (blocking: call from a job thread)."""
        from lab_engines.model_access import ModelView

        lease = self.pool.checkout_blocking(lab_record(self.registry.get(model_id)), purpose=LAB, progress=progress)
        handle = lease.adapter.torch_handle()
        if not handle.causal:
            self.pool.discard(lease)
            raise Unsupported(f"Model `{model_id}` is not a decoder (causal LM): the Lab's engines need one.",
                              hint=HINT_MODEL)
        return LabCopy(model_id, lease, ModelView(handle.model, handle.tokenizer))

    def call_runner(self, model_id: str, function: str, args: list) -> object:
        """runner.<function>(*args) in a custom runner's process, on a lease of its serving instance
        (the runner serves requests and Lab calls in turn). Blocking: call from a job thread."""
        lease = self.pool.acquire_blocking(model_id)
        try:
            return self.pool.call_blocking(lease, lambda adapter: adapter.call_runner(function, *args))
        finally:
            lease.release()

    def discard(self, copy: LabCopy) -> None:
        """Give a copy back to be unloaded (its weights may no longer be the model's)."""
        self.pool.discard(copy.lease)

    def checkin(self, copy: LabCopy) -> None:
        copy.lease.release()

    def copies(self) -> list[dict]:
        """What GET /lab/models lists: each loaded copy, busy (a job has it) or idle."""
        now = self.pool.now()
        return [{"model": c.model_id, "state": "busy" if c.busy else "idle", "memory_bytes": c.memory,
                 "idle_s": 0.0 if c.busy else round(now - c.last_used, 1)}
                for c in self.pool.instances(LAB)]
