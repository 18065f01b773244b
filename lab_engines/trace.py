"""The Lab's attribution engine (POST /lab/trace): which prompt tokens, layers and heads drive a target
continuation of the prompt.

Target: `target` text (tokenized on its own, no special tokens: include its leading space), or the
model's greedy continuation of `max_target_tokens` tokens (stopping early at EOS). The model is fed
prefix + prompt + target[:-1] (no chat template) and the score is
  target_fn "logprob": F = sum_j log p(target_j | prefix, prompt, target_<j)     (default)
  target_fn "logit":   F = sum_j logit(target_j | prefix, prompt, target_<j)
Methods:
  grad_act              dF/dx . x at the input embeddings (per token), the residual stream after each
                        layer (per layer and position) and each head's output before o_proj (per head).
  integrated_gradients  IG over the prompt's embeddings from a baseline (prefix and target tokens keep
                        theirs); layers and heads by conductance on the same path. Adaptive Gauss-Legendre
                        panels (trace_ig): at most n_steps gradient points, fewer once the bound on the
                        completeness gap is under `tolerance` x |delta|. Reports delta = F(input) -
                        F(baseline), completeness_gap = |sum of token attributions - delta|, relative_gap
                        = gap / |delta|. Baselines: "zero" embeddings, "pad" (the pad token's embedding at
                        every prompt position), "token" (baseline_token_id's), "input" (all exactly zero).
                        Measured on SmolLM2-135M (CPU, 2 cores) at the defaults, fourteen 8-21 token
                        prompts: relative_gap 0.08-0.7%, layer_relative_gap 0.2-6.1%, in 8-47 s
                        (144-510 points; 13 of 14 converged under the 2% bound before the cap).
  attention_rollout     Abnar & Zuidema rollout over prefix + prompt, read at its last position (the one
                        that predicts the first target token); F is still reported.
The prefix is fed but never attributed or interpolated: it anchors the attention sink, without which IG
paths from a zero baseline are chaotic on SmolLM2 (F jumps by several nats at a < 1e-6). `prefix` None
(default): "<|endoftext|>" when the vocabulary has it (the document separator GPT-2-style vocabularies such as
SmolLM2's were pretrained with; on SmolLM2 it gives smoother IG paths than the chat BOS <|im_start|>), else
the tokenizer's BOS, else nothing; "" = no prefix; any other text is tokenized (special tokens included)."""
from __future__ import annotations

import json
import time

import torch

from lab_engines.context import JobContext
from lab_engines.model_access import ModelView
from lab_engines.trace_grad import Objective, grad_act
from lab_engines.trace_ig import integrated_gradients
from lab_engines.trace_plots import plot_heatmap, plot_tokens
from lab_engines.trace_rollout import attention_rollout
from lab_engines.trace_spec import BASELINES, BATCH_TOKENS, LIMITS, MAX_TARGET_TOKENS, METHODS, TARGET_FNS, TraceSpec

__all__ = ["BASELINES", "FORMULAS", "METHODS", "TARGET_FNS", "TraceSpec", "run_trace"]

FORMULAS = {
    "logprob": "F = sum_j log p(target_j | prefix, prompt, target_<j)",
    "logit": "F = sum_j logit(target_j | prefix, prompt, target_<j)",
}
DOCUMENT_START = "<|endoftext|>"


def run_trace(view: ModelView, spec: TraceSpec, ctx: JobContext) -> dict:
    """Attribute F (the target's score) to prompt tokens, layers and heads; writes trace.json and PNGs."""
    started = time.perf_counter()
    _validate(view, spec)
    ctx.progress(0.0, "tokenizing")
    prompt_ids = view.encode(spec.prompt)
    prefix = torch.tensor(_prefix_ids(view, spec.prefix), dtype=torch.long, device=view.device)
    context = torch.cat([prefix, prompt_ids[0]]).unsqueeze(0)  # what the model reads before the target
    _check_length(view, context.shape[1])
    with torch.inference_mode(False):  # a caller in inference mode would make every tensor unusable for autograd
        target_ids, source = _target(view, context, spec, ctx)
        fed = torch.cat([context[0], target_ids[:-1]]).unsqueeze(0)
        _check_length(view, fed.shape[1])
        obj = Objective(view, fed, target_ids, len(prefix), context.shape[1], spec.target_fn)
        result = _header(view, spec, obj, source)
        result |= _run_method(view, spec, obj, ctx)
    result["elapsed_s"] = round(time.perf_counter() - started, 3)
    ctx.check()
    ctx.progress(0.95, "writing artifacts")
    result["artifacts"] = _write_artifacts(ctx, result, spec.plots)
    ctx.progress(1.0, "done")
    return result


def _validate(view: ModelView, spec: TraceSpec) -> None:
    """User-facing checks (msgspec.convert checks types and Literals; a spec built in Python is not)."""
    if not isinstance(spec.prompt, str) or not spec.prompt.strip():
        raise ValueError("`prompt` is empty: give the text whose tokens to attribute.")
    if spec.target is not None and (not isinstance(spec.target, str) or not spec.target):
        raise ValueError("`target` is empty: give the continuation to attribute, or leave it out to use the "
                         "model's greedy continuation.")
    for name, allowed in (("method", METHODS), ("baseline", BASELINES), ("target_fn", TARGET_FNS)):
        if getattr(spec, name) not in allowed:
            raise ValueError(f"Unknown {name} `{getattr(spec, name)}`: one of {', '.join(allowed)}.")
    for name, (low, high) in LIMITS.items():
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"`{name}` must be an integer from {low} to {high} (got {value!r}).")
    if isinstance(spec.tolerance, bool) or not isinstance(spec.tolerance, int | float) \
            or not 0.0 <= spec.tolerance < 1.0:
        raise ValueError(f"`tolerance` must be a number from 0 to 1 (got {spec.tolerance!r}).")
    if spec.baseline == "token":
        token_id = spec.baseline_token_id
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < view.vocab_size:
            raise ValueError(f"baseline `token` needs `baseline_token_id`, a token id from 0 to "
                             f"{view.vocab_size - 1} (got {token_id!r}).")
    if spec.baseline == "pad" and view.tokenizer.pad_token_id is None:
        raise ValueError("This model's tokenizer has no pad token: use baseline `zero`, or `token` with "
                         "`baseline_token_id`.")


def _prefix_ids(view: ModelView, prefix: str | None) -> list[int]:
    """The fixed tokens fed before the prompt (see the module docstring)."""
    if prefix is not None:
        return view.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    vocab = view.tokenizer.get_vocab()
    if DOCUMENT_START in vocab:
        return [vocab[DOCUMENT_START]]
    return [] if view.bos_id is None else [view.bos_id]


def _check_length(view: ModelView, seq: int) -> None:
    limit = getattr(view.model.config, "max_position_embeddings", None)
    if limit and seq > limit:
        raise ValueError(f"Prompt + target is {seq} tokens, more than the model's context ({limit}).")


def _target(view: ModelView, prompt_ids: torch.Tensor, spec: TraceSpec, ctx: JobContext):
    """Target token ids [m] and where they came from ("given" or "greedy")."""
    if spec.target is not None:
        ids = view.tokenizer(spec.target, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("`target` has no tokens.")
        if len(ids) > MAX_TARGET_TOKENS:
            raise ValueError(f"`target` is {len(ids)} tokens: at most {MAX_TARGET_TOKENS}.")
        return torch.tensor(ids, dtype=torch.long, device=view.device), "given"
    return _greedy(view, prompt_ids, spec.max_target_tokens, ctx), "greedy"


def _greedy(view: ModelView, prompt_ids: torch.Tensor, n: int, ctx: JobContext) -> torch.Tensor:
    """The model's own argmax continuation, up to n tokens, stopping after EOS. No KV cache: n is small."""
    ids, out = prompt_ids, []
    eos = view.tokenizer.eos_token_id
    with torch.no_grad():
        for i in range(n):
            ctx.check()
            ctx.progress(0.1 * i / n, f"greedy target: token {i + 1}/{n}")
            token = int(view.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
            if token == eos:
                break
    return torch.tensor(out, dtype=torch.long, device=view.device)


def _header(view: ModelView, spec: TraceSpec, obj: Objective, source: str) -> dict:
    prompt = obj.ids[0, obj.start:obj.stop]
    rollout = spec.method == "attention_rollout"
    return {
        "method": spec.method,
        "target_fn": spec.target_fn,
        "target_fn_formula": FORMULAS[spec.target_fn],
        "target_source": source,
        "target": view.tokenizer.decode(obj.target.tolist()),
        "target_tokens": view.token_strs(obj.target),
        "target_ids": obj.target.tolist(),
        "tokens": view.token_strs(prompt),
        "token_ids": prompt.tolist(),
        "positions": view.token_strs(obj.ids[0, : obj.stop] if rollout else obj.ids),
        "prefix_tokens": view.token_strs(obj.ids[0, : obj.start]) if obj.start else [],
        "n_layers": view.n_layers,
        "n_heads": view.n_heads,
    }


def _run_method(view: ModelView, spec: TraceSpec, obj: Objective, ctx: JobContext) -> dict:
    def progress(fraction: float, message: str) -> None:
        ctx.progress(0.1 + 0.85 * fraction, message)

    if spec.method == "grad_act":
        return grad_act(obj, ctx, progress)
    if spec.method == "attention_rollout":
        progress(0.0, "attention rollout")
        with torch.no_grad():
            value = obj.score(obj.embeds())[0].item()
        return {"target_value": value} | attention_rollout(view, obj.ids[:, : obj.stop], obj.start, ctx)
    baseline = _baseline(view, spec, obj)
    batch = min(spec.batch_size, max(1, BATCH_TOKENS // obj.ids.shape[1]))  # bounds memory on long prompts
    out = integrated_gradients(obj, baseline, spec.n_steps, batch, spec.tolerance, ctx, progress)
    return {"baseline": spec.baseline, "baseline_token_id": _baseline_id(view, spec), "n_steps": spec.n_steps,
            "tolerance": spec.tolerance, "batch_size": batch,
            "quadrature": "adaptive_gauss_legendre"} | out


def _baseline_id(view: ModelView, spec: TraceSpec) -> int | None:
    if spec.baseline == "pad":
        return int(view.tokenizer.pad_token_id)
    return spec.baseline_token_id if spec.baseline == "token" else None


def _baseline(view: ModelView, spec: TraceSpec, obj: Objective) -> torch.Tensor:
    """[seq, d]: the input embeddings with the prompt positions replaced per spec.baseline."""
    x = obj.embeds()[0]
    base = x.clone()
    if spec.baseline == "zero":
        base[obj.start:obj.stop] = 0.0
    elif spec.baseline in ("pad", "token"):
        with torch.no_grad():
            row = view.embed(torch.tensor([_baseline_id(view, spec)], device=view.device))[0]
        base[obj.start:obj.stop] = row
    return base


def _write_artifacts(ctx: JobContext, result: dict, plots: bool) -> list[str]:
    """trace.json (the result, artifacts list included) and, if plots, the PNGs it names."""
    names = ["trace.json"]
    if plots:
        names += _write_plots(ctx, result)
    result["artifacts"] = names
    (ctx.artifact_dir / "trace.json").write_text(json.dumps(result), encoding="utf-8")
    return names


def _write_plots(ctx: JobContext, result: dict) -> list[str]:
    title = f"{result['method']}: {result['target_fn']} of {result['target']!r}"
    folder = ctx.artifact_dir
    plot_tokens(folder / "trace_tokens.png", result["tokens"], result["token_attributions"], title)
    rollout = result["method"] == "attention_rollout"
    plot_heatmap(folder / "trace_layers.png", result["layer_token_attributions"], result["positions"],
                 title + (" (rollout after each layer)" if rollout else " (per layer and position)"),
                 "position", diverging=not rollout)
    names = ["trace_tokens.png", "trace_layers.png"]
    if "head_attributions" in result:
        plot_heatmap(folder / "trace_heads.png", result["head_attributions"],
                     [str(h) for h in range(result["n_heads"])], title + " (per head)", "head", diverging=True)
        names.append("trace_heads.png")
    return names
