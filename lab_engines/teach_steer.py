"""`steer`: a steering vector from the Lab's contrastive method (lab_engines.steering: mean residual after
`layer` at the last token of the positive texts minus the negative's), positive = the prompt followed by the
target, negative = the prompt followed by the old answer (`rejected`, or the model's greedy answer). Steering
adds coefficient × vector to the residual after that layer at every position of every request, so it is a
blunt instrument: the evaluation runs with it on everywhere. `layer` defaults to n_layers // 2 and must be
>= 1 (llama.cpp's control vectors cannot act on layer 0); `coefficient` None tries COEFFICIENTS (smallest first) and
keeps the first that makes greedy decoding give every target (else the one with the best target log-prob).
Exported as adapters/overlay.py's steering file (tensor "vector" [d_model], float32)."""
from __future__ import annotations

import torch

from lab_engines.causal_runs import add
from lab_engines.model_access import intervene
from lab_engines.steering import steering_vector
from lab_engines.teach_common import Attempt, Job, Skip, write_safetensors
from lab_engines.teach_eval import Variant, score

__all__ = ["COEFFICIENTS", "run_steer"]

COEFFICIENTS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)


def _variant(vector: torch.Tensor, layer: int, coefficient: float, view) -> Variant:
    return Variant(apply=lambda: intervene(view, {("resid", layer): add(coefficient * vector.to(view.device),
                                                                       (slice(None),))}))


def run_steer(job: Job) -> Attempt:
    view, spec = job.view, job.spec
    layer = view.n_layers // 2 if spec.layer is None else spec.layer
    if not 1 <= layer < view.n_layers:
        raise ValueError(f"`layer` {layer} cannot be steered: use 1..{view.n_layers - 1} "
                         "(llama.cpp cannot steer layer 0).")
    pairs = [c for c in job.cases if c.old != c.target]
    if not pairs:
        raise Skip("steer needs an old answer that differs from the target (the model already answers it)")
    job.span(0.0, "steer: contrastive vector")
    positive = [c.prompt.render(view) + c.target_text for c in pairs]
    negative = [c.prompt.render(view) + c.old_text for c in pairs]
    vector = steering_vector(view, positive, negative, layer)
    options = COEFFICIENTS if spec.coefficient is None else (spec.coefficient,)
    tried, best = [], None
    for k, coefficient in enumerate(options):
        job.span(0.2 + 0.8 * k / len(options), f"steer: coefficient {coefficient}")
        with _variant(vector, layer, coefficient, view).active():
            scored = score(view, [(c.prompt.ids(view), c.target) for c in job.cases], None, job.ctx)
        fixed, mean = all(s.exact for s in scored), sum(s.mean_lp for s in scored) / len(scored)
        tried.append({"coefficient": coefficient, "fixes": fixed, "target_logprob": mean})
        if best is None or fixed or mean > best[1]:
            best = (coefficient, mean)
        if fixed:
            break
    coefficient = best[0]
    details = {"layer": layer, "coefficient": coefficient, "norm": float(vector.norm()), "tried": tried}

    def write(folder, prefix):
        file = f"{prefix}steer.safetensors"
        write_safetensors(folder / file, {"vector": vector}, {"layer": str(layer), "base_sha256": spec.base_sha256,
                                                             "coefficient": repr(coefficient)})
        return [{"kind": "steering", "weight": 1.0, "file": file, "layer": layer, "coefficient": coefficient}]

    return Attempt("steer", _variant(vector, layer, coefficient, view), details, write)
