"""The teach engines: `train_target` (one correction) and `train_live` (every queued correction of a model).

Every run, on the Lab's torch copy:
  1. snapshot: the sha256 of every tensor (lab_engines.teach_guard.Guard);
  2. the corrections as token ids; the old answer is `rejected` / `bad`, else the model's greedy answer;
  3. the baseline evaluation (lab_engines.teach_eval.Suite);
  4. the method (lab_engines.teach_bias, teach_rome, teach_lora, teach_steer), then the same evaluation
     with its change applied; `auto` tries AUTO_ORDER (cheapest first) and stops at the first method that
     fixes every correction (greedy gives the target) without harming the regression set, reporting why
     each other one was skipped, failed or not tried;
  5. always — also on an error or a cancel — the copy back to its exact base weights (edited tensors copied
     back, hooks removed, requires_grad and train/eval mode put back) and every tensor re-hashed:
     `restored_identical`;
  6. unless the change harmed the regression set or the given neighbours past `regression_threshold` (then
     `reverted: true`, `revert_reason`, no components), the components: files written into the job folder
     (ctx.artifact_dir), dicts returned (kinds per adapters/overlay.py and the aura design: token_bias,
     prompt_delta, lora, steering). A method that ran but did not fix the correction still emits them
     (`report.fixed: false`); auto emits only a winner.
Result: {method, components, report, reverted, revert_reason, restored_identical, timings, artifacts}; the same
is written to teach.json."""
from __future__ import annotations

import json
import logging
import math
import time

import msgspec

from lab_engines.context import JobContext
from lab_engines.model_access import ModelView
from lab_engines.teach_bias import run_prompt, run_token_bias
from lab_engines.teach_common import Attempt, Job, Skip, Span
from lab_engines.teach_eval import Case, Reference, Suite, load_regression
from lab_engines.teach_guard import Guard
from lab_engines.teach_lora import run_dpo, run_lora
from lab_engines.teach_rome import run_rome
from lab_engines.teach_spec import AUTO_ORDER, LIVE_AUTO_ORDER, TrainLiveSpec, TrainTargetSpec
from lab_engines.teach_steer import run_steer
from lab_engines.teach_text import Prompt, answer_ids, greedy_batch

__all__ = ["METHODS", "run_train_live", "run_train_target"]

METHODS = {"token_bias": run_token_bias, "prompt": run_prompt, "rome": run_rome, "lora": run_lora, "dpo": run_dpo,
           "steer": run_steer}
RESULT_FILE = "teach.json"
log = logging.getLogger("omniloader.lab")


def _checked(spec, kind: type):
    """The spec through msgspec again, so that a spec built in Python meets the same bounds as a request."""
    try:
        return msgspec.convert(msgspec.to_builtins(spec), kind)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from exc


def _old(view: ModelView, prompt: Prompt, given: str | None, n: int, field: str,
         ctx: JobContext) -> tuple[list[int], str]:
    if given is not None:
        ids = answer_ids(view, given, field)
        return ids, given
    ids = greedy_batch(view, [prompt.ids(view)], n, None, ctx)[0] or [view.tokenizer.eos_token_id]
    return ids, view.tokenizer.decode(ids)


def _references(view: ModelView, items, prompt_of, n: int, field: str, ctx: JobContext) -> list[Reference]:
    """Neighbours (or extra regression items): the given answer, else the greedy one (all in one batch)."""
    prompts = []
    for i, item in enumerate(items):
        if not item.prompt:
            raise ValueError(f"`{field}[{i}].prompt` is empty.")
        prompts.append(prompt_of(item.prompt))
    missing = [i for i, item in enumerate(items) if item.answer is None]
    answers = dict(zip(missing, greedy_batch(view, [prompts[i].ids(view) for i in missing], n, None, ctx)))
    out = []
    for i, (item, prompt) in enumerate(zip(items, prompts)):
        if item.answer is not None:
            out.append(Reference(prompt, answer_ids(view, item.answer, f"{field}[{i}].answer"), item.answer, True))
        else:
            ids = answers[i] or [view.tokenizer.eos_token_id]
            out.append(Reference(prompt, ids, view.tokenizer.decode(ids), False))
    return out


def _regression(view: ModelView, spec, n: int, ctx: JobContext) -> list[Reference]:
    shipped = []
    if spec.regression_set == "shipped":
        shipped = [Reference(Prompt(text=p), answer_ids(view, a, "regression"), a, True) for p, a in load_regression()]
    return shipped + _references(view, spec.regression_extra, lambda t: Prompt(text=t), n, "regression_extra", ctx)


def run_train_target(view: ModelView, spec: TrainTargetSpec, ctx: JobContext) -> dict:
    spec = _checked(spec, TrainTargetSpec)
    if not spec.target:
        raise ValueError("`target` is empty: give the answer the model should give.")
    if spec.subject is not None and spec.method not in ("rome", "auto"):
        raise ValueError("`subject` is only used by the `rome` method (and `auto`).")
    prompt = Prompt.of(spec.prompt, spec.messages)

    def build(job_ctx: JobContext) -> tuple[list[Case], list[Reference], list[Reference]]:
        target = answer_ids(view, spec.target, "target")
        n = spec.answer_tokens or len(target)
        old, old_text = _old(view, prompt, spec.rejected, n, "rejected", job_ctx)
        case = Case(prompt, target, spec.target, old, old_text, [prompt.replaced(p) for p in spec.paraphrases if p])
        neighbors = _references(view, spec.neighbors, prompt.replaced, n, "neighbors", job_ctx)
        return [case], neighbors, _regression(view, spec, n, job_ctx)

    order = list(spec.auto_methods or AUTO_ORDER) if spec.method == "auto" else [spec.method]
    return _run(view, spec, ctx, build, order, auto=spec.method == "auto", subject=spec.subject)


def run_train_live(view: ModelView, spec: TrainLiveSpec, ctx: JobContext) -> dict:
    spec = _checked(spec, TrainLiveSpec)
    if not spec.corrections:
        raise ValueError("`corrections` is empty: there is nothing queued to train on.")
    prompts = []
    for i, c in enumerate(spec.corrections):
        if not c.good:
            raise ValueError(f"`corrections[{i}].good` is empty.")
        prompts.append(Prompt.of(c.prompt, c.messages, f"corrections[{i}].prompt"))

    def build(job_ctx: JobContext) -> tuple[list[Case], list[Reference], list[Reference]]:
        cases = []
        for i, (c, prompt) in enumerate(zip(spec.corrections, prompts)):
            job_ctx.check()
            target = answer_ids(view, c.good, f"corrections[{i}].good")
            old, old_text = _old(view, prompt, c.bad, spec.answer_tokens or len(target), f"corrections[{i}].bad",
                                 job_ctx)
            cases.append(Case(prompt, target, c.good, old, old_text))
        n = spec.answer_tokens or max(len(c.target) for c in cases)
        first = prompts[0]
        neighbors = _references(view, spec.neighbors, first.replaced, n, "neighbors", job_ctx)
        return cases, neighbors, _regression(view, spec, n, job_ctx)

    order = list(spec.auto_methods or LIVE_AUTO_ORDER) if spec.method == "auto" else [spec.method]
    return _run(view, spec, ctx, build, order, auto=spec.method == "auto", subject=None)


def _summary(report: dict) -> dict:
    spec = report["specificity"]
    return {"efficacy_greedy": report["efficacy"]["greedy"], "efficacy_score": report["efficacy"]["score"],
            "generalization_greedy": report["generalization"]["greedy"],
            "neighbors_kept": spec["neighbors"]["kept"], "regression_broken": spec["regression"]["broken"],
            "kl_mean": spec["kl"]["mean"]}


def _run(view: ModelView, spec, ctx: JobContext, build, order: list[str], auto: bool, subject: str | None) -> dict:
    started, timings = time.perf_counter(), {}
    clock = time.perf_counter
    span = Span(ctx)
    guard = Guard(view, ctx)
    timings["snapshot"] = clock() - started
    result: dict = {"method": None, "components": [], "report": {}, "reverted": False, "revert_reason": None}
    winner: tuple[Attempt, object, dict] | None = None
    try:
        span(0.02, "preparing the corrections")
        t = clock()
        cases, neighbors, regression = build(ctx)
        timings["prepare"] = clock() - t
        span(0.05, "baseline evaluation")
        t = clock()
        suite = Suite(view, cases, neighbors, regression, spec.regression_threshold, spec.fluency_tokens, ctx)
        timings["baseline"] = clock() - t
        job = Job(view, spec, cases, guard, ctx, span, subject)
        attempts, share = [], 0.8 / len(order)
        for k, name in enumerate(order):
            if winner is not None:
                attempts.append({"method": name, "status": "not_tried", "reason": f"{winner[0].method} won first"})
                continue
            lo = 0.15 + share * k
            job.span = Span(ctx, lo, lo + share * 0.85)
            t = clock()
            try:
                attempt = METHODS[name](job)
            except Skip as exc:
                if not auto:
                    raise ValueError(f"`{name}` does not apply here: {exc}.") from exc
                attempts.append({"method": name, "status": "skipped", "reason": str(exc)})
                timings[name] = {"train": clock() - t}
                continue
            train_s = clock() - t
            Span(ctx, lo + share * 0.85, lo + share)(0.0, f"{name}: evaluating")
            t = clock()
            if auto and not suite.quick_fixed(attempt.variant):  # the cheap check first: the prompts alone
                timings[name] = {"train": train_s, "evaluate": clock() - t}
                attempts.append({"method": name, "status": "not_fixed", "seconds": round(train_s + clock() - t, 3),
                                 "reason": suite.why_not(attempt.variant)})
                continue
            after = suite.measure(attempt.variant, generate=not auto)
            timings[name] = {"train": train_s, "evaluate": clock() - t}
            harm, fixed = suite.harm(after), suite.fixed(after)
            report = suite.report(after)
            status = "harmful" if harm else ("won" if fixed else "not_fixed")
            entry = {"method": name, "status": status, **_summary(report), "seconds": round(train_s + clock() - t, 3)}
            if harm:
                entry["reason"] = harm
            elif not fixed:
                entry["reason"] = _why_not(report)
            attempts.append(entry)
            if not auto or status == "won":
                winner = (attempt, after, report)
        if auto and winner is not None:  # fluency of the winner only: generations are the slow part
            t = clock()
            attempt, after, _ = winner
            suite.generate(attempt.variant, after)
            winner = (attempt, after, suite.report(after))
            timings["fluency"] = clock() - t
    finally:
        t = clock()
        restore = guard.restore()
        timings["restore"] = clock() - t
    result["restored_identical"] = restore["restored_identical"]
    result["restore"] = restore
    if winner is None:  # auto: nothing fixed it
        result.update(reverted=True, revert_reason="no method fixed the correction without harm (to the regression "
                      "set or the neighbours): " + "; ".join(f"{a['method']} {a['status']}" + (f" ({a['reason']})" if a.get("reason")
                                                                            else "") for a in attempts))
        result["report"] = {"attempts": attempts, "fixed": False}
    else:
        attempt, after, report = winner
        harm = suite.harm(after)
        result["method"] = attempt.method
        result["report"] = {**report, "fixed": suite.fixed(after), "details": attempt.details}
        if auto:
            result["report"]["attempts"] = attempts
        if harm:
            result.update(reverted=True, revert_reason=harm)
        else:
            result["components"] = attempt.write(ctx.artifact_dir, "")
    files = [c["file"] for c in result["components"] if c.get("file")]
    timings["total"] = clock() - started
    result["timings"] = {k: (round(v, 3) if isinstance(v, float) else {a: round(b, 3) for a, b in v.items()})
                         for k, v in timings.items()}
    result["artifacts"] = [*files, RESULT_FILE]
    result = _finite(result)  # a diverged run's NaN log-probs are null in JSON
    if not result["restored_identical"]:
        log.error("teach: the copy differs from its snapshot after the restore (%s): do not reuse it",
                  restore["changed_tensors"][:5])
    (ctx.artifact_dir / RESULT_FILE).write_text(json.dumps(result, indent=1, allow_nan=False, default=str))
    span(1.0, "done" if not result["reverted"] else "reverted")
    return result


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _why_not(report: dict) -> str:
    bad = [c for c in report["efficacy"]["cases"] if not c["greedy"]["after"]]
    if not bad:
        return "not fixed"
    c = bad[0]
    return (f"greedy still does not give the target on {c['prompt']!r} (target log-prob "
            f"{c['target_logprob']['before']:.2f} -> {c['target_logprob']['after']:.2f}, rank "
            f"{c['target_rank']['before']} -> {c['target_rank']['after']})")

