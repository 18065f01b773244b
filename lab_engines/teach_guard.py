"""The copy is always given back as it was: a teach run hashes every tensor first (lab_engines.snapshots'
tensor_digest), keeps a clone of each tensor a method edits in place before the edit, and at the end — on
success, failure or cancel — copies those clones back, puts back each parameter's requires_grad and the
model's train/eval mode, removes any hook the run left behind, and hashes every tensor again.
`restored_identical` is true only when every hash equals the snapshot's.

Also here: the parameter-delta gate (the relative Frobenius norm of a change to a weight matrix)."""
from __future__ import annotations

import torch

from lab_engines.context import JobContext
from lab_engines.model_access import ModelView
from lab_engines.snapshots import weight_digests

__all__ = ["Guard", "relative_delta"]


def _hook_ids(model) -> dict[int, tuple[set, set, set]]:
    return {id(m): (set(m._forward_hooks), set(m._forward_pre_hooks), set(m._backward_hooks))
            for m in model.modules()}


class Guard:
    def __init__(self, view: ModelView, ctx: JobContext | None = None) -> None:
        self.view = view
        self.digests = weight_digests(view, None)
        self.flags = {name: p.requires_grad for name, p in view.model.named_parameters()}
        self.training = view.model.training
        self.hooks = _hook_ids(view.model)
        self.saved: dict[str, torch.Tensor] = {}
        self.ctx = ctx

    def save(self, name: str, tensor: torch.Tensor) -> None:
        """Keep a clone of `tensor` (a state-dict entry) before it is edited in place; the first clone wins."""
        if name not in self.saved:
            self.saved[name] = tensor.detach().clone()

    def put_back(self) -> list[str]:
        """Copy the saved tensors back (bit for bit) and forget them; the names restored."""
        tensors = dict(self.view.model.state_dict(keep_vars=True))
        with torch.no_grad():
            for name, saved in self.saved.items():
                tensors[name].copy_(saved)
        names, self.saved = list(self.saved), {}
        return names

    def restore(self) -> dict:
        """Everything back as it was before the run; the verification."""
        restored = self.put_back()
        model = self.view.model
        for name, p in model.named_parameters():
            p.requires_grad_(self.flags.get(name, p.requires_grad))
            p.grad = None
        model.train(self.training)
        stray = 0
        for m in model.modules():
            before = self.hooks.get(id(m), (set(), set(), set()))
            for table, keep in zip((m._forward_hooks, m._forward_pre_hooks, m._backward_hooks), before):
                for key in [k for k in table if k not in keep]:
                    del table[key]
                    stray += 1
        after = weight_digests(self.view, None)
        changed = sorted(name for name in self.digests if after.get(name) != self.digests[name])
        return {"restored_identical": after == self.digests, "changed_tensors": changed, "restored": restored,
                "stray_hooks_removed": stray}


def relative_delta(delta_norm: float, weight: torch.Tensor) -> float:
    """||ΔW||_F / ||W||_F."""
    return float(delta_norm) / max(float(weight.detach().float().norm()), 1e-12)
