"""Batched, edited forward passes for the causal engines, all in one fixed batch geometry.

Why a fixed geometry: on CPU the BLAS picks its kernels by matrix size, so one row computed in a
batch of 1 and in a batch of 16 can differ in the last bits (measured on SmolLM2-135M: ~3e-5 in the
logits), while rows of one batch size agree bit for bit. So every pass of an analysis runs exactly
`size` rows (the last chunk padded), and the references (clean, corrupt) and the clean activations
that get patched in come from rows of such a pass. That is what makes "patching the whole clean
residual restores the clean metric" hold exactly rather than to 1e-5.

An Edit takes one row's activation [1, seq, ...] and returns the replacement (never in place);
the same edits work on a batch-1 run through model_access.intervene."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lab_engines.causal_spec import LOGIT_BUDGET
from lab_engines.context import JobContext
from lab_engines.model_access import ModelView, capture, intervene

__all__ = ["BatchRunner", "Edit", "Index", "Key", "Row", "add", "logit_diff", "logprob", "loss", "prob", "put", "set_to"]

Key = tuple[str, int]  # (site, layer) as in model_access; ("embed", 0) for the embeddings
Edit = Callable[[torch.Tensor], torch.Tensor]
Index = tuple  # indexes after the batch dim: (pos,), (slice(None), head), (slice(a, b),)


def _at(index: Index) -> tuple:
    return (slice(None), *index)


def put(source: torch.Tensor, index: Index) -> Edit:
    """Copy source[:, *index] (source [1, seq, ...], e.g. a clean activation) into the row."""
    def edit(act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        out[_at(index)] = source[_at(index)].to(out.dtype)
        return out
    return edit


def set_to(value: torch.Tensor | float, index: Index) -> Edit:
    """Overwrite act[:, *index] with value (broadcast: 0.0 for zero ablation, a mean vector)."""
    def edit(act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        out[_at(index)] = value.to(out.dtype) if isinstance(value, torch.Tensor) else value
        return out
    return edit


def add(delta: torch.Tensor, index: Index) -> Edit:
    """act[:, *index] + delta (noise on subject embeddings, a steering vector)."""
    def edit(act: torch.Tensor) -> torch.Tensor:
        out = act.clone()
        out[_at(index)] = out[_at(index)] + delta.to(out.dtype)
        return out
    return edit


@dataclass
class Row:
    """One sequence of a batched pass and the edits applied to it alone."""

    ids: torch.Tensor  # [seq]
    edits: dict[Key, Edit] = field(default_factory=dict)


def _batch_hooks(rows: list[Row]) -> dict[Key, Callable[[torch.Tensor], torch.Tensor]]:
    """One hook per (site, layer) that applies each row's own edit to its slice of the batch."""
    by_key: dict[Key, list[tuple[int, Edit]]] = defaultdict(list)
    for r, row in enumerate(rows):
        for key, edit in row.edits.items():
            by_key[key].append((r, edit))

    def hook_for(pairs: list[tuple[int, Edit]]):
        def hook(act: torch.Tensor) -> torch.Tensor:
            out = act.clone()
            for r, edit in pairs:
                out[r:r + 1] = edit(act[r:r + 1])
            return out
        return hook
    return {key: hook_for(pairs) for key, pairs in by_key.items()}


class BatchRunner:
    """Runs Rows `size` at a time (padded), for n_rows rows of seq tokens; keep_all keeps logits at
    every position (for the loss), otherwise only the last position's."""

    def __init__(self, view: ModelView, ctx: JobContext, n_rows: int, batch_size: int, seq: int,
                 keep_all: bool = False) -> None:
        if batch_size < 1:
            raise ValueError("`batch_size` must be at least 1.")
        cap = max(1, LOGIT_BUDGET // (seq * view.vocab_size)) if keep_all else batch_size
        self.view, self.ctx, self.keep_all = view, ctx, keep_all
        self.size = max(1, min(batch_size, n_rows, cap))

    def _pass(self, rows: list[Row], sites: list[Key]) -> tuple[torch.Tensor, dict[Key, torch.Tensor]]:
        padded = rows + [Row(rows[0].ids)] * (self.size - len(rows))
        ids = torch.stack([row.ids for row in padded]).to(self.view.device)
        with torch.no_grad(), intervene(self.view, _batch_hooks(padded)), capture(self.view, list(sites)) as store:
            logits = self.view.logits(ids, logits_to_keep=0 if self.keep_all else 1)
        return logits[:len(rows)], {key: act[:len(rows)] for key, act in store.items()}

    def forward(self, rows: list[Row], sites: list[Key] = ()) -> tuple[torch.Tensor, dict[Key, torch.Tensor]]:
        """Logits [len(rows), seq or 1, vocab] and the activations at sites, `size` rows per pass."""
        parts = []
        for start in range(0, len(rows), self.size):
            self.ctx.check()
            parts.append(self._pass(rows[start:start + self.size], sites))
        logits = torch.cat([part[0] for part in parts])
        return logits, {key: torch.cat([part[1][key] for part in parts]) for key in parts[0][1]}

    def map(self, rows: list[Row], reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             span: tuple[float, float] = (0.0, 1.0), message: str = "") -> torch.Tensor:
        """reduce(logits, ids) of every row, concatenated; cancel is checked before each pass."""
        outs, lo, hi = [], *span
        for start in range(0, len(rows), self.size):
            self.ctx.check()
            chunk = rows[start:start + self.size]
            logits, _ = self._pass(chunk, [])
            outs.append(reduce(logits, torch.stack([row.ids for row in chunk])))
            done = start + len(chunk)
            self.ctx.progress(lo + (hi - lo) * done / len(rows), f"{message} {done}/{len(rows)}")
        return torch.cat(outs)


# --- metrics: logits [n, seq or 1, vocab], ids [n, seq] -> [n] --------------------------------
def logit_diff(a: int, b: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda logits, _ids: logits[:, -1, a] - logits[:, -1, b]


def logprob(a: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda logits, _ids: torch.log_softmax(logits[:, -1], dim=-1)[:, a]


def prob(a: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda logits, _ids: torch.softmax(logits[:, -1], dim=-1)[:, a]


def loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row over its own tokens (needs keep_all logits)."""
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), ids[:, 1:].to(logits.device), reduction="none")
    return per_token.mean(dim=1)
