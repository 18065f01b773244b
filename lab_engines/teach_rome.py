"""`rome`: a rank-one edit of one MLP down-projection (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", §3), for a subject -> object correction.

  context  where the fact is read: the prompt plus the answer tokens the target and the old answer share (a
           chat answer often repeats the question: "The capital of France is"), predicting the old answer's
           next token there (the "answer" below). The NLL below is over the target's remaining tokens.
  subject  `subject` (its last occurrence after the question starts: the one nearest the answer), or, when
           absent: the candidate whose corruption lowers the answer's probability most, candidates being the
           runs of capitalised words (names) in the question and the shared answer prefix, without a leading
           function word ("The", "What", ...), or every word when there is no name; corruption is Gaussian
           noise (3 × the embedding std, TRACE_SAMPLES draws) on the candidate's token embeddings.
  layer    `layer`, or by causal tracing: with the subject's tokens corrupted the same way, the clean MLP
           outputs are restored at the subject's last token in a window of TRACE_WINDOW layers around each
           scanned layer (1 .. 2/3 of the depth, every n_layers // 15-th: the windowed effect is smooth; layer
           0's MLP acts on the token itself, and an edit there spreads to every context of it); the layer with
           the largest indirect effect on the answer's probability wins.
  k*       the input of layers[layer].mlp.down_proj at the subject's last token, averaged over the context
           and the context behind each of KEY_PREFIXES (raw prompts; a chat context uses itself only).
  v*       W k* + δ, with δ (added to the down_proj output at the subject's last token) optimised by Adam
           (`rome_steps` at `rome_lr`) for: the target's mean NLL (on the context and its prefixed forms)
           + `kl_factor` × KL(p_before || p_δ) of the next token after "{subject} is a" (keeps what else the
           model says about the subject) + `rome_weight_decay` × ||δ||² / ||W k*||²; ||δ|| is clamped to
           `clamp_norm_factor` × ||W k*|| and to the parameter-delta gate (||ΔW||_F = ||δ|| / ||k*|| at most
           `max_delta_norm` × ||W||_F). Stops once the NLL < 0.05 (ROME's rule), or once every row greedily
           gives the target with a mean NLL under ln 2.
  C = I    the key covariance of ROME's update (C⁻¹ k*) is taken as the identity, so the update is the
           minimum-norm rank-one change with W' k* = v*:  ΔW = (v* − W k*) k*ᵀ / (k*ᵀ k*).
The edit is applied in place on the copy for the evaluation (the weight is saved first and copied back
after), and emitted as a rank-1 LoRA (adapters/overlay.py): B = v* − W k* [out, 1], A = k*ᵀ / (k*ᵀ k*)
[1, in], rank 1, alpha 1 (scale 1)."""
from __future__ import annotations

import dataclasses
import math
import re
import time
from contextlib import contextmanager

import torch

from lab_engines.causal_runs import BatchRunner, Row, add, prob, put
from lab_engines.causal_tracing import window_layers
from lab_engines.model_access import ModelView
from lab_engines.teach_common import Attempt, Job, Skip, frozen, write_safetensors
from lab_engines.teach_eval import Variant, answer_logits
from lab_engines.teach_guard import relative_delta
from lab_engines.teach_text import Prompt

__all__ = ["KEY_PREFIXES", "pick_layer", "pick_subject", "run_rome", "subject_tokens"]

KEY_PREFIXES = ("Here is a fact.\n", "I read this somewhere.\n", "Note:\n", "Quiz question.\n")
TRACE_SAMPLES = 3
TRACE_WINDOW = 10
TRACE_BATCH = 32
FUNCTION_WORDS = {"The", "A", "An", "What", "Which", "Who", "Whom", "Whose", "Where", "When", "Why", "How", "Is", "Are",
                  "Was", "Were", "Do", "Does", "Did", "In", "On", "At", "Of", "My", "Our", "Your", "This", "That",
                  "These", "Those", "It", "Its", "Tell", "Name", "Please", "I", "Q", "A:"}
STOP_NLL = 0.05  # ROME's: v* is done once the target's mean NLL is under this ...
STOP_EXACT_NLL = math.log(2)  # ... or once every row greedily gives the target and its NLL is under ln 2
MODULE = "mlp.down_proj"


def token_text(view: ModelView, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of ids decoded token by token, and each token's [start, end) in it."""
    text, spans = "", []
    for token in ids:
        piece = view.tokenizer.decode([token])
        spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


def _region(view: ModelView, prompt: Prompt, ids: list[int]) -> tuple[str, list[tuple[int, int]], int]:
    """Token text of ids (the prompt and the shared answer prefix) and where the question starts in it."""
    text, spans = token_text(view, ids)
    prompt_end = spans[len(prompt.ids(view)) - 1][1]
    start = text.rfind(prompt.question, 0, prompt_end) if prompt.chat else 0
    return text, spans, max(start, 0)


def subject_tokens(view: ModelView, prompt: Prompt, ids: list[int], subject: str) -> tuple[int, int]:
    """Token positions [start, end) of the subject's last occurrence after the question starts (in a chat
    answer that repeats the question, the one nearest the answer)."""
    text, spans, start = _region(view, prompt, ids)
    at = text.rfind(subject, start) if subject else -1
    if at < 0:
        raise ValueError(f"`subject` {subject!r} is not in the prompt {prompt.question!r}.")
    lo, hi = at, at + len(subject)
    hits = [i for i, (a, b) in enumerate(spans) if a < hi and b > lo]
    if not hits:
        raise ValueError(f"`subject` {subject!r} covers no token of the prompt.")
    return hits[0], hits[-1] + 1


def _noise(view: ModelView, n: int, width: int, seed: int) -> torch.Tensor:
    std = 3.0 * float(view.embed.weight.detach().float().std())
    return torch.randn(n, width, view.d_model, generator=torch.Generator().manual_seed(seed)) * std


def _divergence(view: ModelView, prompt_ids: list[int], target: list[int], old: list[int]
                ) -> tuple[list[int], int, int]:
    """Where the fact is read: the prompt plus the answer tokens target and old share (a chat answer often
    starts with the question's words), and the old answer's token there (the model's own when old ends first)."""
    d = next((i for i, (t, o) in enumerate(zip(target, old)) if t != o), min(len(target), len(old)))
    if d == len(target):
        raise Skip("the model already answers the target (its old answer starts with it)")
    ids = prompt_ids + target[:d]
    if d < len(old):
        return ids, old[d], d
    with torch.no_grad():
        return ids, int(view.logits(torch.tensor([ids], device=view.device), logits_to_keep=1)[0, -1].argmax()), d


def _words(text: str, start: int) -> list[tuple[int, int]]:
    """Candidate subjects after `start`: runs of capitalised words (names: "Eiffel Tower", "J.K. Rowling"),
    without leading FUNCTION_WORDS; every word when there is no such run."""
    words = [(m.start(), m.end()) for m in re.finditer(r"\w(?:[\w'’.-]*\w)?", text[start:])]
    words = [(a + start, b + start) for a, b in words]
    runs, run = [], []
    for a, b in words:
        if text[a].isupper() and (not run or text[run[-1][1]:a] == " "):
            run.append((a, b))
            continue
        runs.append(run)
        run = [(a, b)] if text[a].isupper() else []
    runs.append(run)
    names = []
    for run in runs:
        while run and text[run[0][0]:run[0][1]] in FUNCTION_WORDS:
            run = run[1:]
        if run:
            names.append((run[0][0], run[-1][1]))
    return names or words


def pick_subject(job: Job, prompt: Prompt, ids: list[int], answer: int) -> str:
    """Of the candidate subjects (_words) in the question and the answer's shared prefix, the one whose
    corruption (noise on its tokens' embeddings) lowers the probability of the old answer most."""
    view = job.view
    text, spans, start = _region(view, prompt, ids)
    candidates = []
    for a, b in _words(text, start):
        hits = [i for i, (x, y) in enumerate(spans) if x < b and y > a and i < len(ids) - 1]
        if hits:
            candidates.append(((a, b), (hits[0], hits[-1] + 1)))
    if not candidates:
        raise Skip("no subject: the prompt is too short to hold one; give `subject`")
    if len(candidates) == 1:
        (a, b), _ = candidates[0]
        return text[a:b]
    row = torch.tensor(ids)
    rows = []
    for _chars, (lo, hi) in candidates:
        noise = _noise(view, TRACE_SAMPLES, hi - lo, job.spec.seed)
        rows += [Row(row, {("embed", 0): add(noise[k], (slice(lo, hi),))}) for k in range(TRACE_SAMPLES)]
    runner = BatchRunner(view, job.ctx, len(rows), TRACE_BATCH, row.numel())
    probs = runner.map(rows, prob(answer)).view(len(candidates), TRACE_SAMPLES).mean(dim=1)
    (a, b), _ = candidates[int(probs.argmin())]
    return text[a:b]


def pick_layer(job: Job, ids: list[int], last: int, span: tuple[int, int], answer: int) -> tuple[int, dict]:
    """The layer whose MLP window, restored at the subject's last token, brings back most of the answer
    (every TRACE_STRIDE-th layer is scanned: the windowed effect is smooth across layers)."""
    view = job.view
    row = torch.tensor(ids)
    top = max(1, (2 * view.n_layers) // 3)
    scanned = list(range(1, top, max(1, view.n_layers // 15))) or [0]
    keys = [("mlp", layer) for layer in range(view.n_layers)]
    runner = BatchRunner(view, job.ctx, 1 + TRACE_SAMPLES * (len(scanned) + 1), TRACE_BATCH, row.numel())
    _logits, clean = runner.forward([Row(row)], sites=keys)
    noise = _noise(view, TRACE_SAMPLES, span[1] - span[0], job.spec.seed)
    noisy = [{("embed", 0): add(noise[k], (slice(*span),))} for k in range(TRACE_SAMPLES)]
    rows = [Row(row, dict(e)) for e in noisy]
    for layer in scanned:
        restore = {("mlp", w): put(clean[("mlp", w)][0:1], (last,))
                   for w in window_layers(view.n_layers, layer, TRACE_WINDOW)}
        rows += [Row(row, {**e, **restore}) for e in noisy]
    probs = runner.map(rows, prob(answer)).view(-1, TRACE_SAMPLES).mean(dim=1)
    effects = (probs[1:] - probs[0]).tolist()
    return scanned[int(torch.tensor(effects).argmax())], dict(zip(scanned, effects))


def _rows(job: Job, prompt: Prompt, ids: list[int], last: int) -> list[tuple[list[int], int]]:
    """(context ids, subject's last position) of the context and its prefixed forms."""
    rows = [(ids, last)]
    if not prompt.chat:
        for prefix in KEY_PREFIXES:
            pre = job.view.tokenizer(prefix, add_special_tokens=False)["input_ids"]
            rows.append((pre + ids, last + len(pre)))
    return rows


def _down(view: ModelView, layer: int):
    return view.layers[layer].mlp.down_proj


def _key(job: Job, layer: int, rows: list[tuple[list[int], int]]) -> torch.Tensor:
    """k*: the mean down_proj input at the subject's last token over the rows."""
    got = []

    def hook(_module, args):
        got.append(args[0].detach())

    handle = _down(job.view, layer).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for ids, last in rows:
                job.view.logits(torch.tensor([ids], device=job.view.device), logits_to_keep=1)
                got[-1] = got[-1][0, last]
    finally:
        handle.remove()
    return torch.stack(got).mean(dim=0).float()


def _optimise(job: Job, layer: int, rows, target: list[int], kl_ids: list[int], kl_last: int, v0: torch.Tensor,
              cap: float) -> tuple[torch.Tensor, list[float], dict]:
    spec, view = job.spec, job.view
    seqs = [ids + target for ids, _ in rows] + [kl_ids]
    spans = [(len(ids) - 1, len(ids) + len(target) - 1) for ids, _ in rows] + [(len(kl_ids) - 1, len(kl_ids))]
    positions = [last for _, last in rows] + [kl_last]
    delta = torch.zeros(view.d_model, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=spec.rome_lr)
    rows_idx = torch.arange(len(seqs))
    pos_idx = torch.tensor(positions)

    def hook(_module, _args, output):
        out = output.clone()
        out[rows_idx, pos_idx] = out[rows_idx, pos_idx] + delta.to(out.dtype)
        return out

    kl_ref = torch.log_softmax(answer_logits(view, [kl_ids], [spans[-1]])[0][0], dim=-1)
    limit = min(spec.clamp_norm_factor * float(v0.norm()), cap)
    curve, clipped, bound = [], 0, False
    handle = _down(view, layer).register_forward_hook(hook)
    try:
        for step in range(spec.rome_steps):
            job.span(step / spec.rome_steps, f"rome: optimising v*, step {step + 1}/{spec.rome_steps}")
            opt.zero_grad()
            logits = answer_logits(view, seqs, spans, grad=True)
            wanted = torch.tensor(target)
            nll = torch.stack([-torch.log_softmax(at, dim=-1).gather(1, wanted[:, None]).mean()
                               for at in logits[:-1]]).mean()
            exact = all(bool((at.detach().argmax(dim=-1) == wanted).all()) for at in logits[:-1])
            kl_now = torch.log_softmax(logits[-1][0], dim=-1)
            kl = torch.sum(kl_ref.exp() * (kl_ref - kl_now))
            decay = spec.rome_weight_decay * delta.norm() ** 2 / max(float(v0.norm()) ** 2, 1e-12)
            loss = nll + spec.kl_factor * kl + decay
            curve.append(round(nll.item(), 5))
            if nll.item() < STOP_NLL or (exact and nll.item() < STOP_EXACT_NLL):
                break
            loss.backward()
            norm = float(torch.nn.utils.clip_grad_norm_([delta], spec.grad_clip))
            clipped += norm > spec.grad_clip
            opt.step()
            with torch.no_grad():
                if float(delta.norm()) > limit:
                    delta.mul_(limit / float(delta.norm()))
                    bound = True
    finally:
        handle.remove()
    return delta.detach(), curve, {"clipped_steps": clipped, "norm_limit": limit, "norm_limited": bound}


def run_rome(job: Job) -> Attempt:
    if len(job.cases) != 1:
        raise Skip("rome edits one subject -> object fact at a time")
    view, spec, case = job.view, job.spec, job.cases[0]
    ids, answer, d = _divergence(view, case.prompt.ids(view), case.target, case.old)
    clock = time.perf_counter()
    job.span(0.0, "rome: locating the subject")
    subject = job.subject or pick_subject(job, case.prompt, ids, answer)
    phases = {"subject": time.perf_counter() - clock}
    span = subject_tokens(view, case.prompt, ids, subject)
    last = span[1] - 1
    layer, effects = spec.layer, None
    if layer is None:
        job.span(0.05, "rome: causal tracing for the layer")
        layer, effects = pick_layer(job, ids, last, span, answer)
    elif not 0 <= layer < view.n_layers:
        raise ValueError(f"`layer` {layer} is out of range: the model has layers 0..{view.n_layers - 1}.")
    phases["layer"] = time.perf_counter() - clock - phases["subject"]
    rows = _rows(job, case.prompt, ids, last)
    down = _down(view, layer)
    weight = down.weight
    k = _key(job, layer, rows)
    v0 = (weight.detach().float() @ k)
    cap = spec.max_delta_norm * float(k.norm()) * float(weight.detach().float().norm())
    kl_text = f"{subject} is a"
    kl_ids = view.tokenizer(kl_text, add_special_tokens=False)["input_ids"]
    kl_last = subject_tokens(view, Prompt(text=kl_text), kl_ids, subject)[1] - 1
    with frozen(view):
        delta, curve, gate = _optimise(dataclasses.replace(job, span=job.span.sub(0.2, 1.0)), layer, rows,
                                       case.target[d:], kl_ids, kl_last, v0, cap)
    phases["optimise"] = time.perf_counter() - clock - sum(phases.values())
    b = delta[:, None]  # [out, 1] = v* - W k*
    a = (k / k.dot(k))[None, :]  # [1, in]
    name = f"model.layers.{layer}.{MODULE}.weight"

    @contextmanager
    def apply():
        job.guard.save(name, weight)
        with torch.no_grad():
            weight.add_((b @ a).to(weight.dtype))
        try:
            yield
        finally:
            job.guard.put_back()

    delta_norm = float(delta.norm()) / float(k.norm())  # ||B A||_F
    details = {"subject": subject, "subject_tokens": list(span), "layer": layer, "module": MODULE,
               "layer_effects": effects, "nll_curve": curve, "delta_norm": float(delta.norm()),
               "value_norm": float(v0.norm()), "key_norm": float(k.norm()),
               "relative_delta": relative_delta(delta_norm, weight), "max_delta_norm": spec.max_delta_norm,
               "rank": int(torch.linalg.matrix_rank(b @ a)), "key_prefixes": len(rows) - 1, **gate,
               "covariance": "identity (C = I)", "seconds": {k: round(v, 3) for k, v in phases.items()}}

    def write(folder, prefix):
        file = f"{prefix}rome.safetensors"
        write_safetensors(folder / file, {f"layers.{layer}.{MODULE}.lora_A": a, f"layers.{layer}.{MODULE}.lora_B": b},
                          {"rank": "1", "alpha": "1.0", "base_sha256": spec.base_sha256, "method": "rome"})
        return [{"kind": "lora", "weight": 1.0, "file": file, "rank": 1, "alpha": 1.0, "modules": [MODULE],
                 "layers": [layer]}]

    if not math.isfinite(details["delta_norm"]):
        raise Skip("rome: the optimisation diverged (non-finite δ)")
    return Attempt("rome", Variant(apply=apply), details, write)
