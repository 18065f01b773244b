"""Evaluation of a teach run, the way the ROME paper reports an edit (Meng et al. 2022, CounterFact):

  efficacy        on each correction's prompt: the target's mean token log-prob beats the old answer's
                  ("score"), greedy decoding gives exactly the target's tokens ("greedy"), and the target's
                  log-prob and first-token rank before and after
  generalization  the same on the paraphrases
  specificity     neighbours keep their answer (given, or the model's greedy answer before the run) as the
                  greedy answer; the shipped regression set (lab_engines/probes/regression.jsonl: prompt ->
                  `correct` continuation the default model gets right) keeps its answers; and the KL
                  divergence KL(before || after) of the next-token distribution on a few unrelated prompts
  fluency         ROME's n-gram entropy (2/3 bigram + 4/3 trigram entropy, averaged, in bits) of short greedy
                  generations

"Greedy gives exactly these tokens" is measured teacher-forced (the argmax of logits + bias at each answer
position is the answer's token), which is the same as greedy decoding producing them. A change is harmful
when more than `regression_threshold` of the regression items the model got right before the run break, or
of the given neighbours (prompts whose answers must not change) it answered before change their answer;
regression items whose prompt is part of a correction (its prompt or question, a paraphrase, the target or the
old answer: a chat answer repeats "The capital of France is") are left out. A Variant is what a
method changes: a prompt delta (rendered into every evaluated prompt), a logit bias (added to every
evaluated distribution) and hooks or edited weights (active inside `variant.active()`)."""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lab_engines.context import JobContext
from lab_engines.model_access import ModelView
from lab_engines.teach_text import Prompt, greedy_batch

__all__ = ["KL_PROMPTS", "REGRESSION_FILE", "Case", "Reference", "Suite", "Variant", "answer_logits", "load_regression",
           "ngram_entropy", "score"]

REGRESSION_FILE = Path(__file__).resolve().parent / "probes" / "regression.jsonl"
KL_PROMPTS = ("Once upon a time, there was a little", "My favourite hobby is", "The recipe calls for two cups of",
              "In 1998, the company announced that", "The weather today is")
FLUENCY_PROMPTS = ("Once upon a time,", "The best way to learn a language is")
ROWS_PER_PASS = 16
SHOWN = 8  # cases whose greedy answer after the run is generated and shown


@dataclass
class Variant:
    delta: str = ""
    bias: dict[int, float] = field(default_factory=dict)
    apply: Callable[[], AbstractContextManager] | None = None

    def bias_vector(self, view: ModelView) -> torch.Tensor | None:
        if not self.bias:
            return None
        vec = torch.zeros(view.vocab_size)
        for token, value in self.bias.items():
            vec[int(token)] = max(-100.0, min(100.0, float(value)))
        return vec

    def active(self) -> AbstractContextManager:
        return self.apply() if self.apply is not None else nullcontext()


@dataclass
class Case:
    """One correction: on `prompt` answer `target` (tokens) instead of `old`."""

    prompt: Prompt
    target: list[int]
    target_text: str
    old: list[int]
    old_text: str
    paraphrases: list[Prompt] = field(default_factory=list)


@dataclass
class Reference:
    """A prompt whose answer must stay: `answer` tokens (given, or the greedy answer before the run)."""

    prompt: Prompt
    answer: list[int]
    text: str
    given: bool


@dataclass
class Scored:
    sum_lp: float
    mean_lp: float
    first_rank: int  # 0: the answer's first token is the top token
    exact: bool  # greedy decoding gives exactly the answer's tokens


def load_regression() -> list[tuple[str, str]]:
    """(prompt, expected continuation) of the shipped regression set."""
    rows = [json.loads(line) for line in REGRESSION_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(row["prompt"], row["correct"]) for row in rows]


def _pad_id(view: ModelView) -> int:
    tok = view.tokenizer
    return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))


def _batch(view: ModelView, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), _pad_id(view), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
    return ids.to(view.device), mask.to(view.device)


def answer_logits(view: ModelView, seqs: list[list[int]], spans: list[tuple[int, int]], grad: bool = False
                  ) -> list[torch.Tensor]:
    """Logits [end - start, vocab] (float32) at positions start..end-1 of each right-padded sequence: the
    decoder runs on every position, the output head only where asked (a fifth of the model on SmolLM2)."""
    ids, mask = _batch(view, seqs)
    with torch.set_grad_enabled(grad):
        hidden = view.model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        head = view.model.get_output_embeddings()
        return [head(hidden[r, a:b]).float() for r, (a, b) in enumerate(spans)]


def score(view: ModelView, rows: list[tuple[list[int], list[int]]], bias: torch.Tensor | None,
          ctx: JobContext | None = None) -> list[Scored]:
    """Teacher-forced scores of each (context, answer) pair, ROWS_PER_PASS right-padded rows a pass."""
    out = []
    for start in range(0, len(rows), ROWS_PER_PASS):
        if ctx is not None:
            ctx.check()
        chunk = rows[start:start + ROWS_PER_PASS]
        logits = answer_logits(view, [c + a for c, a in chunk], [(len(c) - 1, len(c) + len(a) - 1) for c, a in chunk])
        for at, (_context, answer) in zip(logits, chunk):
            if bias is not None:
                at = at + bias.to(at.device)
            lp = torch.log_softmax(at, dim=-1)
            target = torch.tensor(answer, device=at.device)
            token_lp = lp.gather(1, target[:, None])[:, 0]
            out.append(Scored(sum_lp=float(token_lp.sum()), mean_lp=float(token_lp.mean()),
                              first_rank=int((at[0] > at[0, answer[0]]).sum()),
                              exact=bool((at.argmax(dim=-1) == target).all())))
    return out


def next_logprobs(view: ModelView, seqs: list[list[int]], bias: torch.Tensor | None) -> torch.Tensor:
    """log p(next token) [n, vocab] after each sequence."""
    last = torch.cat(answer_logits(view, seqs, [(len(s) - 1, len(s)) for s in seqs]))
    if bias is not None:
        last = last + bias.to(last.device)
    return torch.log_softmax(last, dim=-1)


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency measure: the weighted mean of the n-gram entropies (bits) of the text's words."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    parts = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        parts.append(w * -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0)
    return sum(parts) / len(parts)


@dataclass
class Measure:
    cases: list[tuple[Scored, Scored]]  # (target, old) per case
    paraphrases: list[list[tuple[Scored, Scored]]]
    neighbors: list[tuple[Scored, Scored | None]]  # (reference, target of the single case)
    regression: list[Scored]
    kl: torch.Tensor  # [n_prompts, vocab] log-probs
    fluency: list[str] | None = None
    answers: list[str] | None = None  # greedy answers of the first SHOWN cases


class Suite:
    """The evaluation set of a run, measured once on the base model (`self.base`), then after each method."""

    def __init__(self, view: ModelView, cases: list[Case], neighbors: list[Reference], regression: list[Reference],
                 threshold: float, fluency_tokens: int, ctx: JobContext) -> None:
        self.view, self.cases, self.neighbors, self.ctx = view, cases, neighbors, ctx
        self.threshold, self.fluency_tokens = threshold, fluency_tokens
        asked = [_norm(t) for c in cases for t in (c.prompt.question, c.target_text, c.old_text,
                                                    *(p.question for p in c.paraphrases))]

        def about_the_correction(ref: Reference) -> bool:  # "The capital of France is" in "...France is Paris."
            return any(_norm(ref.prompt.text) in text for text in asked)

        self.excluded = [r.prompt.text for r in regression if about_the_correction(r)]
        self.regression = [r for r in regression if not about_the_correction(r)]
        self.base = self.measure(Variant(), generate=True)
        self.right_before = [s.exact for s in self.base.regression]

    # --- measuring ----------------------------------------------------------------------------------------
    def measure(self, variant: Variant, generate: bool = True) -> Measure:
        """Everything scored with the variant applied; `generate` adds the fluency samples and the greedy answers
        (the slow part: one forward pass a token)."""
        view, delta, single = self.view, variant.delta, len(self.cases) == 1
        rows: list[tuple[list[int], list[int]]] = []
        for case in self.cases:
            ids = case.prompt.ids(view, delta)
            rows += [(ids, case.target), (ids, case.old)]
            for p in case.paraphrases:
                pids = p.ids(view, delta)
                rows += [(pids, case.target), (pids, case.old)]
        for ref in self.neighbors:
            ids = ref.prompt.ids(view, delta)
            rows += [(ids, ref.answer)] + ([(ids, self.cases[0].target)] if single else [])
        rows += [(ref.prompt.ids(view, delta), ref.answer) for ref in self.regression]
        bias = variant.bias_vector(view)
        with variant.active():
            scored = iter(score(view, rows, bias, self.ctx))
            kl = next_logprobs(view, [Prompt(text=t).ids(view, delta) for t in KL_PROMPTS], bias)
        cases, paraphrases = [], []
        for case in self.cases:
            cases.append((next(scored), next(scored)))
            paraphrases.append([(next(scored), next(scored)) for _ in case.paraphrases])
        neighbors = [(next(scored), next(scored) if single else None) for _ in self.neighbors]
        regression = [next(scored) for _ in self.regression]
        out = Measure(cases, paraphrases, neighbors, regression, kl)
        if generate:
            self.generate(variant, out)
        return out

    def generate(self, variant: Variant, into: Measure) -> None:
        """Fluency samples (the first correction's prompt and FLUENCY_PROMPTS, `fluency_tokens` each) and each
        shown correction's greedy answer, in one batch."""
        view, delta = self.view, variant.delta
        fluent = [self.cases[0].prompt] + [Prompt(text=t) for t in FLUENCY_PROMPTS]
        shown = self.cases[:SHOWN]
        prompts = [p.ids(view, delta) for p in fluent] + [c.prompt.ids(view, delta) for c in shown]
        longest = max([self.fluency_tokens] + [len(c.target) + 4 for c in shown])
        with variant.active():
            outs = greedy_batch(view, prompts, longest, variant.bias_vector(view), self.ctx)
        texts = [view.tokenizer.decode(o[:self.fluency_tokens], skip_special_tokens=True) for o in outs[:len(fluent)]]
        into.fluency = texts if self.fluency_tokens else None
        into.answers = [view.tokenizer.decode(o[:len(c.target) + 4]) for o, c in zip(outs[len(fluent):], shown)]

    # --- verdicts -----------------------------------------------------------------------------------------
    def _prompt_scores(self, variant: Variant) -> list[Scored]:
        view = self.view
        with variant.active():
            return score(view, [(c.prompt.ids(view, variant.delta), c.target) for c in self.cases],
                         variant.bias_vector(view), self.ctx)

    def quick_fixed(self, variant: Variant) -> bool:
        """fixed() from the corrections' prompts alone (one pass; the auto router's first check)."""
        return all(s.exact for s in self._prompt_scores(variant))

    def why_not(self, variant: Variant) -> str:
        scored = self._prompt_scores(variant)
        before = [t for t, _old in self.base.cases]
        misses = [i for i, s in enumerate(scored) if not s.exact]
        i = misses[0] if misses else 0
        return (f"greedy does not give the target on {len(misses)} of {len(scored)} prompt(s), e.g. "
                f"{self.cases[i].prompt.question!r} (target log-prob {before[i].mean_lp:.2f} -> "
                f"{scored[i].mean_lp:.2f}, "
                f"rank {before[i].first_rank} -> {scored[i].first_rank})")

    def fixed(self, after: Measure) -> bool:
        """Every correction's prompt now greedily gives its target."""
        return all(target.exact for target, _old in after.cases)

    def broken(self, after: Measure) -> list[int]:
        return [i for i, (was, now) in enumerate(zip(self.right_before, after.regression)) if was and not now.exact]

    def changed_neighbors(self, after: Measure) -> list[int]:
        pairs = zip(self.base.neighbors, after.neighbors)
        return [i for i, (b, a) in enumerate(pairs) if b[0].exact and not a[0].exact]

    def harm(self, after: Measure) -> str | None:
        """Why the run must be reverted, or None: more than `threshold` of the regression items the model got
        right broke, or of the neighbours (prompts whose answers must not change) that it answered changed."""
        right = sum(self.right_before)
        broken = self.broken(after)
        if right and len(broken) / right > self.threshold:
            names = ", ".join(repr(self.regression[i].prompt.text + self.regression[i].text) for i in broken[:5])
            return (f"the regression set degraded: {len(broken)} of the {right} items the model got right broke "
                    f"({len(broken) / right:.0%} > regression_threshold {self.threshold:.0%}), e.g. {names}")
        kept = sum(b[0].exact for b in self.base.neighbors)
        changed = self.changed_neighbors(after)
        if kept and len(changed) / kept > self.threshold:
            names = ", ".join(repr(self.neighbors[i].prompt.question + self.neighbors[i].text) for i in changed[:5])
            return (f"neighbours changed their answer: {len(changed)} of {kept} ({len(changed) / kept:.0%} > "
                    f"regression_threshold {self.threshold:.0%}), e.g. {names}")
        return None

    # --- the report ---------------------------------------------------------------------------------------
    def report(self, after: Measure) -> dict:
        base = self.base
        cases = []
        for i, case in enumerate(self.cases):
            (bt, bo), (at, ao) = base.cases[i], after.cases[i]
            item = {"prompt": case.prompt.question, "target": case.target_text, "old": case.old_text,
                    "target_logprob": _ba(bt.mean_lp, at.mean_lp), "target_rank": _ba(bt.first_rank, at.first_rank),
                    "old_logprob": _ba(bo.mean_lp, ao.mean_lp),
                    "beats_old": _ba(bt.mean_lp > bo.mean_lp, at.mean_lp > ao.mean_lp),
                    "greedy": _ba(bt.exact, at.exact)}
            if after.answers is not None and i < len(after.answers):
                item["answer_after"] = after.answers[i]
            cases.append(item)
        paraphrases = [{"prompt": p.question, "target_logprob": _ba(b[0].mean_lp, a[0].mean_lp),
                        "beats_old": _ba(b[0].mean_lp > b[1].mean_lp, a[0].mean_lp > a[1].mean_lp),
                        "greedy": _ba(b[0].exact, a[0].exact)}
                       for case, bs, as_ in zip(self.cases, base.paraphrases, after.paraphrases)
                       for p, b, a in zip(case.paraphrases, bs, as_)]
        neighbors = [{"prompt": ref.prompt.question, "answer": ref.text, "given": ref.given,
                      "answer_logprob": _ba(b[0].mean_lp, a[0].mean_lp), "greedy": _ba(b[0].exact, a[0].exact),
                      **({"prefers_answer": a[0].mean_lp > a[1].mean_lp} if a[1] is not None else {})}
                     for ref, b, a in zip(self.neighbors, base.neighbors, after.neighbors)]
        kept = [n["greedy"]["after"] for n in neighbors if n["greedy"]["before"]]
        kl = (base.kl.exp() * (base.kl - after.kl)).sum(dim=-1).clamp_min(0.0)
        broken = self.broken(after)
        right = sum(self.right_before)
        fluency = None
        if after.fluency is not None and base.fluency is not None:
            fluency = {"before": _mean([ngram_entropy(t) for t in base.fluency]),
                       "after": _mean([ngram_entropy(t) for t in after.fluency]), "samples_after": after.fluency}
        return {
            "efficacy": {"n": len(cases), "score": _mean([c["beats_old"]["after"] for c in cases]),
                         "greedy": _mean([c["greedy"]["after"] for c in cases]), "cases": cases},
            "generalization": {"n": len(paraphrases), "score": _mean([p["beats_old"]["after"] for p in paraphrases]),
                               "greedy": _mean([p["greedy"]["after"] for p in paraphrases]), "items": paraphrases},
            "specificity": {
                "neighbors": {"n": len(neighbors), "kept": _mean(kept), "prefers_answer": _mean(
                    [n["prefers_answer"] for n in neighbors if "prefers_answer" in n]),
                              "items": neighbors},
                "regression": {"n": len(self.regression), "right_before": right, "broken": len(broken),
                               "broken_fraction": len(broken) / right if right else 0.0,
                               "kept": (right - len(broken)) / right if right else None,
                               "threshold": self.threshold, "excluded": self.excluded,
                               "broken_items": [self.regression[i].prompt.text + self.regression[i].text
                                                for i in broken]},
                "kl": {"mean": float(kl.mean()), "max": float(kl.max()), "prompts": list(KL_PROMPTS)},
            },
            "fluency": fluency,
        }


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _ba(before, after) -> dict:
    return {"before": before, "after": after}


def _mean(values: list) -> float | None:
    return sum(float(v) for v in values) / len(values) if values else None
