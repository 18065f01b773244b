"""The two methods that leave the weights alone: `token_bias` (a rule patch of logit biases) and `prompt`
(a system-prompt delta).

token_bias: OpenAI logit_bias semantics (a value in [-100, 100] added to a token's logit at every sampling
step). Teacher-forced logits do not depend on the bias (it is added after the model), so the constraints
are exact arithmetic: at each target position i, with target token t_i and the model's logits L_i,
    L_i[t_i] + b[t_i] >= max_{j != t_i} (L_i[j] + b[j]) + margin.
Only target tokens get a bias (positive); the smallest such biases are the least solution of these
difference constraints, found by Bellman-Ford-style relaxation from b = 0 (no solution when a cycle of
positions makes the biases chase each other, or when one would need more than 100). Then greedy decoding
with the bias is run on each prompt to verify; a mismatch (float rounding in the argmax) raises the margin
and solves again, up to VERIFY_ROUNDS times.

prompt: candidate fact statements built from the corrections (raw prompt: "{prompt}{target}." in a few
phrasings; chat: the question and its answer), tried in order with the delta rendered into the prompt
(lab_engines.teach_text: the system message for chat, a prefix line for raw text); the first that makes
greedy decoding give every target wins, else the best by target log-prob is kept (and fails to fix)."""
from __future__ import annotations

import torch

from lab_engines.teach_common import Attempt, Job, Skip
from lab_engines.teach_eval import Variant, score
from lab_engines.teach_text import greedy

__all__ = ["run_prompt", "run_token_bias", "solve_biases"]

MAX_BIAS = 100.0
VERIFY_ROUNDS = 3


def _position_logits(job: Job) -> tuple[list[torch.Tensor], list[int]]:
    """Teacher-forced logits [vocab] at every target position of every case, and the target token there."""
    view, logits, targets = job.view, [], []
    for case in job.cases:
        job.ctx.check()
        ids = case.prompt.ids(view) + case.target
        with torch.no_grad():
            out = view.logits(torch.tensor([ids], device=view.device))[0]
        n = len(ids) - len(case.target)
        logits += [out[n - 1 + k] for k in range(len(case.target))]
        targets += case.target
    return logits, targets


def solve_biases(logits: list[torch.Tensor], targets: list[int], margin: float) -> tuple[dict[int, float], str | None]:
    """The least non-negative biases on the target tokens that make each target the argmax by `margin`,
    or ({...}, reason) when there are none within ±100."""
    tokens = sorted(set(targets))
    index = torch.tensor(tokens)
    rest = []  # best logit among non-target tokens, per position
    for at in logits:
        masked = at.clone()
        masked[index] = -float("inf")
        rest.append(float(masked.max()))
    own = [{u: float(at[u]) for u in tokens} for at in logits]
    bias = {u: 0.0 for u in tokens}
    for _round in range(len(tokens) + 2):
        changed = False
        for i, t in enumerate(targets):
            rival = max([rest[i]] + [own[i][u] + bias[u] for u in tokens if u != t])
            need = rival - own[i][t] + margin
            if need > bias[t] + 1e-9:
                bias[t], changed = need, True
        if max(bias.values()) > MAX_BIAS:
            worst = max(bias, key=bias.get)
            return bias, f"token {worst} would need a bias of {bias[worst]:.1f}, more than {MAX_BIAS:.0f}"
        if not changed:
            return {u: b for u, b in bias.items() if b > 0}, None
    return bias, "the target positions conflict: raising one target token makes another position lose (no bias fits)"


def run_token_bias(job: Job) -> Attempt:
    view, margin = job.view, job.spec.bias_margin
    job.span(0.0, "token_bias: teacher-forced logits")
    logits, targets = _position_logits(job)
    rounds = []
    for attempt in range(VERIFY_ROUNDS):
        bias, problem = solve_biases(logits, targets, margin)
        if problem:
            raise Skip(problem)
        variant = Variant(bias={int(k): round(v, 4) for k, v in bias.items()})
        vector = variant.bias_vector(view)
        job.span(0.5 + 0.5 * attempt / VERIFY_ROUNDS, "token_bias: verifying by greedy generation")
        generated = [greedy(view, c.prompt.ids(view), len(c.target), vector, job.ctx, stop_at_eos=False)
                     for c in job.cases]
        ok = [g == c.target for g, c in zip(generated, job.cases)]
        rounds.append({"margin": margin, "biased_tokens": len(bias), "verified": all(ok)})
        if all(ok):
            break
        margin += 1.0
    details = {"bias": {str(k): v for k, v in variant.bias.items()},
               "tokens": {str(k): view.tokenizer.decode([k]) for k in variant.bias},
               "max_bias": max(variant.bias.values(), default=0.0), "rounds": rounds,
               "verified_by_greedy": rounds[-1]["verified"]}

    def write(_folder, _prefix):
        return [{"kind": "token_bias", "weight": 1.0, "bias": {str(k): v for k, v in variant.bias.items()}}]

    return Attempt("token_bias", variant, details, write)


def _statement(prompt: str, target: str) -> str:
    text = (prompt + target).strip()
    return text if text[-1:] in ".!?" else text + "."


def candidates(job: Job) -> list[str]:
    """Prompt deltas to try, most literal first."""
    if all(not c.prompt.chat for c in job.cases):
        facts = " ".join(_statement(c.prompt.text, c.target_text) for c in job.cases)
        return [facts, f"Fact: {facts}", f"Remember these facts and use them: {facts}"]
    pairs = [(c.prompt.question.strip(), c.target_text.strip()) for c in job.cases]
    return ["\n".join(f"Q: {q}\nA: {a}" for q, a in pairs),
            " ".join(f'When asked "{q}", answer "{a}".' for q, a in pairs),
            " ".join(f'Important: the answer to "{q}" is "{a}". Always answer with it.' for q, a in pairs)]


def run_prompt(job: Job) -> Attempt:
    view, tried, best = job.view, [], None
    options = candidates(job)
    for k, text in enumerate(options):
        job.span(k / len(options), f"prompt: trying delta {k + 1}/{len(options)}")
        scored = score(view, [(c.prompt.ids(view, text), c.target) for c in job.cases], None, job.ctx)
        fixed = all(s.exact for s in scored)
        mean = sum(s.mean_lp for s in scored) / len(scored)
        tried.append({"text": text, "fixes": fixed, "target_logprob": mean})
        if best is None or fixed or mean > best[1]:
            best = (text, mean)
        if fixed:
            break
    text = best[0]

    def write(_folder, _prefix):
        return [{"kind": "prompt_delta", "weight": 1.0, "text": text}]

    return Attempt("prompt", Variant(delta=text), {"text": text, "candidates": tried}, write)
