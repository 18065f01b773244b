"""`lora` and `dpo`: low-rank adapters trained on the copy, exported in adapters/overlay.py's format.

The LoRA is written by hand rather than with peft, so the copy's modules are never replaced: each target
Linear (`modules` of `layers`, relative to model.model.layers[i]) gets a forward hook adding
scale × (x Aᵀ) Bᵀ, scale = alpha / rank, A [rank, in] initialised as peft does (Kaiming-uniform, a = √5,
seeded), B [out, rank] zero, so the adapter starts as the identity. Removing the hooks gives the base model
back exactly. The base weights are frozen (their requires_grad is put back after the run).

  lora  minimises the mean NLL of each correction's target tokens given its prompt (raw prompts also
        behind the same few prefixes ROME uses for its keys, for generalisation), Adam, at most `steps` at
        `lr`, stopping once every correction's own prompt greedily gives its target and the mean NLL is under
        ln 2 (training on, the fact spreads to its neighbours: measured on the default model, "The capital of
        France is" -> " Rome" at lr 2e-4 stopped after 26 steps with 1 of 47 regression items broken; at
        1e-3 it took 7 steps and broke 9, every other capital becoming Rome).
  dpo   Direct Preference Optimization (Rafailov et al. 2023) on (prompt, good = target, bad = rejected
        or the model's greedy answer) pairs, the adapter-disabled model as the reference policy:
          loss = -log σ(β [(log π(good) - log π_ref(good)) - (log π(bad) - log π_ref(bad))])
        with sequence log-probs summed over the answer's tokens. B = 0 at step 0, so π = π_ref and the
        loss is ln 2 exactly. The reward margin is β × the bracket.

Distance gates, both on by default: the global gradient norm is clipped to `grad_clip` each step, and
after each step any module whose change scale ‖B A‖_F exceeds `max_delta_norm` × ‖W‖_F has its B scaled
down to that bound (‖B A‖_F² = tr(BᵀB A Aᵀ), r × r, cheap)."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from lab_engines.model_access import ModelView
from lab_engines.teach_common import Attempt, Job, Skip, frozen, write_safetensors
from lab_engines.teach_eval import Variant, answer_logits
from lab_engines.teach_rome import KEY_PREFIXES

__all__ = ["Lora", "run_dpo", "run_lora", "sequence_logprobs"]

MICRO_BATCH = 8  # rows a forward/backward pass; gradients accumulate over the micro-batches of a step
STOP_NLL = math.log(2)  # lora stops once every target is the greedy answer and its mean NLL is under this


class Lora:
    def __init__(self, view: ModelView, modules: list[str], layers: list[int] | None, rank: int, alpha: float,
                 seed: int) -> None:
        layers = list(range(view.n_layers)) if layers is None else sorted(set(layers))
        for layer in layers:
            if not 0 <= layer < view.n_layers:
                raise ValueError(f"`layers` has {layer}: the model has layers 0..{view.n_layers - 1}.")
        self.layers, self.modules = layers, list(dict.fromkeys(modules))
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.enabled = True
        gen = torch.Generator().manual_seed(seed)
        self.targets, self.A, self.B = {}, {}, {}
        for layer in layers:
            for module in self.modules:
                linear = view.layers[layer].get_submodule(module)
                if not isinstance(linear, torch.nn.Linear):
                    raise ValueError(f"layers.{layer}.{module} is not a Linear module: it cannot take a LoRA.")
                key = (layer, module)
                a = torch.empty(rank, linear.in_features)
                bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=√5): U(-1/√in, 1/√in)
                a.uniform_(-bound, bound, generator=gen)
                self.targets[key] = linear
                self.A[key] = a.requires_grad_(True)
                self.B[key] = torch.zeros(linear.out_features, rank, requires_grad=True)

    def parameters(self) -> list[torch.Tensor]:
        return [t for key in self.targets for t in (self.A[key], self.B[key])]

    @contextmanager
    def hooks(self):
        handles = []

        def make(key):
            def hook(_module, args, output):
                if not self.enabled:
                    return None
                x = args[0]
                return output + self.scale * ((x @ self.A[key].t().to(x.dtype)) @ self.B[key].t().to(x.dtype))
            return hook

        try:
            for key, linear in self.targets.items():
                handles.append(linear.register_forward_hook(make(key)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def disabled(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def ratios(self) -> dict[tuple[int, str], float]:
        """‖scale B A‖_F / ‖W‖_F per module."""
        out = {}
        with torch.no_grad():
            for key, linear in self.targets.items():
                a, b = self.A[key], self.B[key]
                sq = torch.trace((b.t() @ b) @ (a @ a.t())).clamp_min(0.0)
                out[key] = self.scale * float(sq.sqrt()) / max(float(linear.weight.detach().float().norm()), 1e-12)
        return out

    def cap(self, limit: float) -> int:
        """Scale down each B whose change exceeds the limit; how many were."""
        hit = 0
        with torch.no_grad():
            for key, ratio in self.ratios().items():
                if ratio > limit:
                    self.B[key].mul_(limit / ratio)
                    hit += 1
        return hit

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for (layer, module) in self.targets:
            out[f"layers.{layer}.{module}.lora_A"] = self.A[(layer, module)].detach()
            out[f"layers.{layer}.{module}.lora_B"] = self.B[(layer, module)].detach()
        return out

    def writer(self, spec, method: str):
        tensors = {k: v.clone() for k, v in self.tensors().items()}

        def write(folder, prefix):
            file = f"{prefix}{method}.safetensors"
            write_safetensors(folder / file, tensors, {"rank": str(self.rank), "alpha": repr(float(self.alpha)),
                                                      "base_sha256": spec.base_sha256, "method": method})
            return [{"kind": "lora", "weight": 1.0, "file": file, "rank": self.rank, "alpha": float(self.alpha),
                     "modules": list(self.modules), "layers": list(self.layers)}]
        return write


def sequence_logprobs(view: ModelView, rows: list[tuple[list[int], list[int]]], exact: bool = False):
    """[n] summed and [n] mean log-probs of each answer given its context (one right-padded pass, with grad
    when grad is enabled); with exact=True also whether greedy decoding gives each answer (teacher-forced)."""
    logits = answer_logits(view, [c + a for c, a in rows], [(len(c) - 1, len(c) + len(a) - 1) for c, a in rows],
                           grad=torch.is_grad_enabled())
    sums, means, exacts = [], [], []
    for at, (_context, answer) in zip(logits, rows):
        target = torch.tensor(answer, device=at.device)
        lp = torch.log_softmax(at, dim=-1).gather(1, target[:, None])[:, 0]
        sums.append(lp.sum())
        means.append(lp.mean())
        exacts.append(bool((at.detach().argmax(dim=-1) == target).all()))
    if exact:
        return torch.stack(sums), torch.stack(means), exacts
    return torch.stack(sums), torch.stack(means)


def _train(job: Job, lora: Lora, name: str, step_fn, early_stop: bool = False) -> dict:
    """The shared loop: step_fn() accumulates the gradients of one step (micro-batch by micro-batch) and
    returns (loss, extra); then clip, Adam step, cap. With early_stop, training ends before a step once every
    correction's prompt greedily gives its target and the loss is under STOP_NLL."""
    spec = job.spec
    opt = torch.optim.Adam(lora.parameters(), lr=spec.lr)
    curve, extras, clipped, capped, norms, stopped = [], [], 0, 0, [], None
    for step in range(spec.steps):
        job.span(step / spec.steps, f"{name}: step {step + 1}/{spec.steps}")
        opt.zero_grad()
        loss, extra = step_fn()
        if early_stop and extra["learned"] and loss < STOP_NLL:
            curve.append(float(loss))
            stopped = step
            break
        norm = float(torch.nn.utils.clip_grad_norm_(lora.parameters(), spec.grad_clip))
        norms.append(norm)
        clipped += norm > spec.grad_clip
        opt.step()
        capped += lora.cap(spec.max_delta_norm)
        curve.append(float(loss))
        extras.append(extra)
    ratios = lora.ratios()
    return {"loss_curve": curve, "extras": extras, "steps_taken": len(norms), "stopped_early_at": stopped,
            "grad_norm_max": max(norms, default=0.0), "clipped_steps": clipped, "capped_module_steps": capped,
            "relative_delta_max": max(ratios.values()), "max_delta_norm": spec.max_delta_norm,
            "grad_clip": spec.grad_clip}


def _lora_for(job: Job) -> Lora:
    spec = job.spec
    return Lora(job.view, list(spec.modules), None if spec.layers is None else list(spec.layers), spec.rank,
                spec.alpha, spec.seed)


def _variant(lora: Lora) -> Variant:
    return Variant(apply=lora.hooks)


def run_lora(job: Job) -> Attempt:
    view, lora = job.view, _lora_for(job)
    rows, mains = [], []  # mains: the corrections' own prompts (the others are prefixed copies)
    for case in job.cases:
        ids = case.prompt.ids(view)
        rows.append((ids, case.target))
        mains.append(True)
        if not case.prompt.chat:
            for prefix in KEY_PREFIXES:
                rows.append((view.tokenizer(prefix, add_special_tokens=False)["input_ids"] + ids, case.target))
                mains.append(False)

    def step_fn():
        total, learned = 0.0, True
        for start in range(0, len(rows), MICRO_BATCH):
            chunk = rows[start:start + MICRO_BATCH]
            _sums, means, exact = sequence_logprobs(view, chunk, exact=True)
            part = -means.sum() / len(rows)
            part.backward()  # accumulate; each micro-batch's graph is freed at once
            total += part.item()
            learned &= all(e for e, main in zip(exact, mains[start:start + MICRO_BATCH]) if main)
        return total, {"learned": learned}

    with frozen(view), lora.hooks():
        report = _train(job, lora, "lora", step_fn, early_stop=True)
    report.pop("extras")
    report.update({"rank": lora.rank, "alpha": lora.alpha, "modules": lora.modules, "layers": lora.layers,
                   "rows": len(rows), "steps": job.spec.steps, "lr": job.spec.lr})
    return Attempt("lora", _variant(lora), report, lora.writer(job.spec, "lora"))


def run_dpo(job: Job) -> Attempt:
    view, spec, lora = job.view, job.spec, _lora_for(job)
    pairs = [(c.prompt.ids(view), c.target, c.old) for c in job.cases if c.old != c.target]
    if not pairs:
        raise Skip("dpo needs a rejected answer that differs from the target (the model already answers it)")
    n, per = len(pairs), max(1, MICRO_BATCH // 2)
    groups = [pairs[s:s + per] for s in range(0, n, per)]  # a pair's good and bad answers share a pass

    def rows(group):
        return [(c, good) for c, good, _bad in group] + [(c, bad) for c, _good, bad in group]

    def margins(g, group, policy):
        k = len(group)
        return spec.beta * ((policy[:k] - ref[g][:k]) - (policy[k:] - ref[g][k:]))

    def step_fn(backward: bool = True):
        loss_total, logits, chosen, rejected = 0.0, [], [], []
        for g, group in enumerate(groups):
            policy = sequence_logprobs(view, rows(group))[0]
            k = len(group)
            z = margins(g, group, policy)
            loss = -torch.nn.functional.logsigmoid(z).sum() / n
            if backward:
                loss.backward()
            loss_total += loss.detach().item()
            logits.append(z.detach())
            chosen.append((policy[:k] - ref[g][:k]).detach())
            rejected.append((policy[k:] - ref[g][k:]).detach())
        z, chosen, rejected = torch.cat(logits), torch.cat(chosen), torch.cat(rejected)
        return loss_total, {"margin": float(z.mean()), "chosen_reward": float(spec.beta * chosen.mean()),
                            "rejected_reward": float(spec.beta * rejected.mean()),
                            "accuracy": float((z > 0).float().mean()), "loss": loss_total}

    with frozen(view), lora.hooks():
        with torch.no_grad(), lora.disabled():
            ref = [sequence_logprobs(view, rows(group))[0] for group in groups]
        report = _train(job, lora, "dpo", step_fn)
        with torch.no_grad():
            _loss, final = step_fn(backward=False)
    extras = report.pop("extras")
    report.update({"loss_step0": report["loss_curve"][0], "ln2": math.log(2),
                   "margin_curve": [round(e["margin"], 6) for e in extras], "final": final, "beta": spec.beta,
                   "pairs": n, "rank": lora.rank, "alpha": lora.alpha, "modules": lora.modules,
                   "layers": lora.layers, "steps": spec.steps, "lr": spec.lr})
    return Attempt("dpo", _variant(lora), report, lora.writer(spec, "dpo"))
