"""What every teach method takes and returns.

A method is `method(job) -> Attempt`: it reads the prepared corrections (`job.cases`, token ids) and the
knobs (`job.spec`), does its work on the copy (tensors it edits in place are saved with `job.guard.save`
first), and returns the change as a Variant the evaluation applies (lab_engines.teach_eval) plus a writer
that turns it into components (files in the job folder). A method that cannot apply raises Skip with the
reason (the auto router records it and tries the next one)."""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lab_engines.context import JobContext
from lab_engines.model_access import ModelView
from lab_engines.teach_eval import Case, Variant
from lab_engines.teach_guard import Guard

__all__ = ["Attempt", "Job", "Skip", "Span", "frozen", "write_safetensors"]


class Skip(Exception):
    """The method does not apply to these corrections (the message says why)."""


class Span:
    """Progress of one phase: maps the phase's 0..1 onto [lo, hi] of the job's, checking for a cancel each time."""

    def __init__(self, ctx: JobContext, lo: float = 0.0, hi: float = 1.0) -> None:
        self.ctx, self.lo, self.hi = ctx, lo, hi

    def __call__(self, fraction: float, message: str) -> None:
        self.ctx.check()
        self.ctx.progress(self.lo + (self.hi - self.lo) * min(max(fraction, 0.0), 1.0), message)

    def sub(self, a: float, b: float) -> Span:
        width = self.hi - self.lo
        return Span(self.ctx, self.lo + width * a, self.lo + width * b)


@dataclass
class Job:
    view: ModelView
    spec: object  # TrainTargetSpec or TrainLiveSpec
    cases: list[Case]
    guard: Guard
    ctx: JobContext
    span: Span
    subject: str | None = None  # rome (train_target)


@dataclass
class Attempt:
    method: str
    variant: Variant
    details: dict = field(default_factory=dict)
    # writes the component files into the folder, returns the component dicts (files named with the prefix)
    write: Callable[[Path, str], list[dict]] = lambda folder, prefix: []
    seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)


@contextmanager
def frozen(view: ModelView):
    """The base weights out of autograd while a method trains its own tensors (else every backward pass would
    fill a gradient as large as the model); their requires_grad is put back after."""
    flags = [(p, p.requires_grad) for p in view.model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
