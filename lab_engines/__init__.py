"""The Lab's algorithms: pure functions of (model view, spec, job context) -> JSON-able result.

ENGINES maps each job kind to its spec type and run function as "module:name" strings, imported
on first use: torch is only imported once somebody uses the Lab."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["ENGINES", "Engine"]


@dataclass(frozen=True)
class Engine:
    kind: str
    spec: str  # "module:SpecStruct"
    run: str  # "module:function(view, spec, ctx) -> dict"

    def spec_type(self) -> type:
        return _load(self.spec)

    def runner(self):
        return _load(self.run)


def _load(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


ENGINES = {e.kind: e for e in (
    Engine("diagnostics", "lab_engines.diagnostics:DiagnosticsSpec", "lab_engines.diagnostics:run_diagnostics"),
    Engine("trace", "lab_engines.trace:TraceSpec", "lab_engines.trace:run_trace"),
    Engine("causal_test", "lab_engines.causal:CausalSpec", "lab_engines.causal:run_causal"),
    Engine("snapshot", "lab_engines.snapshots:SnapshotSpec", "lab_engines.snapshots:run_snapshot"),
    Engine("rollback", "lab_engines.snapshots:RollbackSpec", "lab_engines.snapshots:run_rollback"),
    Engine("train_target", "lab_engines.teach_spec:TrainTargetSpec", "lab_engines.teach:run_train_target"),
    Engine("train_live", "lab_engines.teach_spec:TrainLiveSpec", "lab_engines.teach:run_train_live"),
)}

