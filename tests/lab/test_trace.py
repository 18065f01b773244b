"""The Lab's attribution engine (lab_engines/trace.py) on real models: the tiny seeded llamas for exact
invariants against independent computations, SmolLM2-135M for IG completeness at the defaults."""
from __future__ import annotations

import json
import time

import msgspec
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lab_engines.context import JobCancelled, JobContext
from lab_engines.model_access import attention_patterns
from lab_engines.trace import TraceSpec, run_trace

PROMPT = "The capital of France is a city named"
IG_TOLERANCE = 0.05  # relative completeness gap accepted at the defaults (measured 0.08-0.7%, 14 prompts)
DEFAULT_MODEL_IG_PROMPTS = [
    "The Eiffel Tower stands in Paris, the capital city of the country we call",  # 16 tokens
    # bench/lab_bench.py's prompt: its path has narrow steps (gap 12% with the old 192-point cap)
    "The quick brown fox jumps over the lazy dog while the farmer watches from the barn",
    "def add(a, b):\n    return",  # code; the largest layer gap measured
]


def hooks(view) -> list:
    """Every module's hook ids (transformers installs output-capturing hooks of its own, for good)."""
    return [(list(m._forward_hooks), list(m._forward_pre_hooks)) for m in view.model.modules()]


def trace(view, ctx, **fields) -> dict:
    return run_trace(view, TraceSpec(**({"prompt": PROMPT, "plots": False} | fields)), ctx)


def fed_ids(view, prompt: str, target: list[int]) -> torch.Tensor:
    """<|endoftext|> (the default prefix for this vocabulary) + prompt + target[:-1], built without the engine."""
    prompt_ids = view.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = [view.tokenizer.convert_tokens_to_ids("<|endoftext|>"), *prompt_ids]
    return torch.tensor([ids + target[:-1]])


def target_score(view, prompt: str, target: list[int], fn: str = "logprob", embeds=None) -> float:
    """F computed independently: full logits from input ids (or embeddings), then the target's positions."""
    ids = fed_ids(view, prompt, target)
    with torch.no_grad():
        out = view.model(inputs_embeds=embeds) if embeds is not None else view.model(input_ids=ids)
    logits = out.logits[0, -len(target):].double()
    if fn == "logprob":
        logits = logits.log_softmax(-1)
    return float(logits[torch.arange(len(target)), torch.tensor(target)].sum())


# --- integrated gradients -------------------------------------------------------------------------------
def test_ig_completeness_at_defaults_tiny(tiny_view, job_ctx):
    r = trace(tiny_view, job_ctx)
    assert r["method"] == "integrated_gradients" and r["baseline"] == "zero" and r["converged"]
    assert r["relative_gap"] < IG_TOLERANCE and r["layer_relative_gap"] < IG_TOLERANCE
    assert abs(sum(r["token_attributions"]) - r["delta"]) == pytest.approx(r["completeness_gap"], abs=1e-9)
    assert r["delta"] == pytest.approx(r["target_value"] - r["baseline_value"])
    assert r["target_value"] == pytest.approx(target_score(tiny_view, PROMPT, r["target_ids"]), abs=1e-4)
    # F(baseline) independently: zero embeddings at the prompt positions, the prefix and the rest unchanged
    embeds = tiny_view.embed(fed_ids(tiny_view, PROMPT, r["target_ids"])).detach()
    embeds[0, 1:1 + len(r["tokens"])] = 0.0
    assert r["baseline_value"] == pytest.approx(target_score(tiny_view, PROMPT, r["target_ids"], embeds=embeds),
                                                abs=1e-4)
    assert len(r["token_attributions"]) == len(r["tokens"]) and any(abs(a) > 1e-4 for a in r["token_attributions"])
    assert np.array(r["head_attributions"]).shape == (tiny_view.n_layers, tiny_view.n_heads)


def test_ig_matches_a_dense_midpoint_rule_tiny(tiny_view, job_ctx):
    """Against a plain autograd IG: 400 midpoint steps in a, pad-token baseline (a smooth path on this model)."""
    r = trace(tiny_view, job_ctx, baseline="pad", target=" Paris")
    ids = fed_ids(tiny_view, PROMPT, r["target_ids"])
    x = tiny_view.embed(ids).detach()
    b = x.clone()
    b[0, 1:] = tiny_view.embed.weight[r["baseline_token_id"]].detach()
    steps = 400
    a = ((torch.arange(steps) + 0.5) / steps).view(-1, 1, 1)
    points = (b + a * (x - b)).requires_grad_(True)
    logits = tiny_view.model(inputs_embeds=points, logits_to_keep=1).logits[:, -1]
    logp = logits.log_softmax(-1)[:, r["target_ids"][0]]
    (grad,) = torch.autograd.grad(logp.sum(), points)
    expected = (grad.mean(0) * (x - b)[0]).sum(-1)[1:]
    assert np.allclose(r["token_attributions"], expected.numpy(), atol=2e-3 * abs(r["delta"]))


@pytest.mark.slow
@pytest.mark.parametrize("prompt", DEFAULT_MODEL_IG_PROMPTS)
def test_ig_completeness_at_defaults_default_model(default_view, job_ctx, prompt):
    """The default spec on SmolLM2-135M (time printed, see -s): the completeness gap is within tolerance, never
    above the bound the engine reports, and the layer totals (a full cut of the path each) close too."""
    started = time.perf_counter()
    r = run_trace(default_view, TraceSpec(prompt=prompt, plots=False), job_ctx)
    elapsed = time.perf_counter() - started
    print(f"\nIG on SmolLM2-135M, {len(r['tokens'])} tokens, defaults: {elapsed:.1f} s, {r['n_points']} points, "
          f"relative gap {r['relative_gap']:.2e} (bound {r['gap_bound']:.2e}), layers {r['layer_relative_gap']:.2e}")
    assert r["relative_gap"] < IG_TOLERANCE
    assert r["relative_gap"] <= r["gap_bound"] + 1e-9  # |sum of panel errors| <= sum of |panel errors|
    # layer conductance shares the token path's nodes but integrates dh/dt interpolated between them:
    # measured 0.2-6.1% over fourteen prompts (0.4%, 0.9% and 6.1% on these three), so a looser bound
    assert r["layer_relative_gap"] < 2 * IG_TOLERANCE
    assert r["n_points"] <= 512 and len(r["layer_attributions"]) == 30
    assert np.array(r["head_attributions"]).shape == (30, 9)


def test_attribution_is_exactly_zero_when_baseline_is_input(tiny_view, job_ctx):
    r = trace(tiny_view, job_ctx, baseline="input")
    assert r["delta"] == 0.0 and r["completeness_gap"] == 0.0
    assert all(a == 0.0 for a in r["token_attributions"]) and all(a == 0.0 for a in r["layer_attributions"])
    assert not np.any(r["head_attributions"]) and not np.any(r["layer_token_attributions"])
    # per position: where the baseline token is the input token, nothing moves, so exactly 0
    of_id = tiny_view.tokenizer(" of", add_special_tokens=False)["input_ids"][0]
    r = trace(tiny_view, job_ctx, baseline="token", baseline_token_id=of_id, n_steps=16)
    same = [i for i, t in enumerate(r["token_ids"]) if t == of_id]
    assert same and all(r["token_attributions"][i] == 0.0 for i in same)
    assert all(r["token_attributions"][i] != 0.0 for i in range(len(r["tokens"])) if i not in same)


# --- gradient x activation --------------------------------------------------------------------------------
def test_grad_act_matches_autograd_tiny(tiny_view, job_ctx):
    r = trace(tiny_view, job_ctx, method="grad_act", target=" Paris")
    ids = fed_ids(tiny_view, PROMPT, r["target_ids"])
    embeds = tiny_view.embed(ids).detach().requires_grad_(True)
    out = tiny_view.model(inputs_embeds=embeds, output_hidden_states=True)
    hidden = out.hidden_states[1]  # the residual after layer 0 (the last entry is after the final norm)
    logp = out.logits[0, -1].log_softmax(-1)[r["target_ids"][0]]
    g_embeds, g_hidden = torch.autograd.grad(logp, [embeds, hidden])  # not .backward(): no .grad on the weights
    expected = (g_embeds * embeds)[0, 1:].sum(-1).detach()
    assert np.allclose(r["token_attributions"], expected.numpy(), rtol=1e-4, atol=1e-7)
    layer0 = (g_hidden * hidden)[0].sum(-1).detach()
    assert np.allclose(r["layer_token_attributions"][0], layer0.numpy(), rtol=1e-4, atol=1e-7)
    assert r["layer_attributions"][0] == pytest.approx(float(layer0.sum()), rel=1e-4)
    assert "completeness_gap" not in r


# --- attention rollout -------------------------------------------------------------------------------------
def numpy_rollout(attn: np.ndarray) -> np.ndarray:
    """attn [layers, heads, seq, seq] -> rollout after each layer [layers, seq, seq] (Abnar & Zuidema)."""
    joint, out = np.eye(attn.shape[-1]), []
    for layer in attn:
        mixed = 0.5 * layer.mean(0) + 0.5 * np.eye(attn.shape[-1])
        joint = (mixed / mixed.sum(-1, keepdims=True)) @ joint
        out.append(joint)
    return np.stack(out)


def test_rollout_matches_numpy_rows_sum_to_one_and_causal(tiny_view, job_ctx):
    r = trace(tiny_view, job_ctx, method="attention_rollout")
    ids = fed_ids(tiny_view, PROMPT, [0])
    attn = attention_patterns(tiny_view, ids)[:, 0].double().numpy()
    expected = numpy_rollout(attn)
    matrix = np.array(r["rollout_matrix"])
    assert np.allclose(matrix.sum(-1), 1.0, atol=1e-12)
    assert np.all(np.triu(matrix, 1) == 0.0)
    assert np.allclose(matrix, expected[-1], atol=1e-10)
    assert np.allclose(r["layer_token_attributions"], expected[:, -1], atol=1e-10)
    assert np.allclose(r["token_attributions"], expected[-1, -1, 1:], atol=1e-10)
    assert np.allclose(r["head_attention"], attn[:, :, -1], atol=1e-6)
    assert r["positions"][1:] == r["tokens"] and len(r["positions"]) == ids.shape[1]


def test_prefix_default_none_and_custom(tiny_view, job_ctx):
    r = trace(tiny_view, job_ctx, method="grad_act", target=" Paris")
    assert r["prefix_tokens"] == ["<|endoftext|>"] and r["positions"] == ["<|endoftext|>", *r["tokens"]]
    none = trace(tiny_view, job_ctx, method="grad_act", target=" Paris", prefix="")
    assert none["prefix_tokens"] == [] and none["positions"] == none["tokens"] == r["tokens"]
    assert none["target_value"] != r["target_value"]
    chat = trace(tiny_view, job_ctx, method="grad_act", target=" Paris", prefix="<|im_start|>user\n")
    assert chat["prefix_tokens"] == ["<|im_start|>", "user", "\n"] and chat["tokens"] == r["tokens"]


# --- targets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", ["logprob", "logit"])
def test_given_target_is_tokenized_and_scored(tiny_view, job_ctx, fn):
    target = " Paris and London"
    r = trace(tiny_view, job_ctx, method="grad_act", target=target, target_fn=fn)
    ids = tiny_view.tokenizer(target, add_special_tokens=False)["input_ids"]
    assert r["target_source"] == "given" and r["target_ids"] == ids and len(ids) > 1
    assert r["target"] == target and r["target_tokens"] == tiny_view.token_strs(ids)
    assert r["target_fn"] == fn and r["target_fn_formula"].startswith("F = sum_j " + ("log p" if fn == "logprob"
                                                                                     else "logit"))
    assert r["target_value"] == pytest.approx(target_score(tiny_view, PROMPT, ids, fn), abs=1e-4)
    assert len(r["positions"]) == 1 + len(r["tokens"]) + len(ids) - 1


def test_greedy_target_is_the_models_argmax_continuation(tiny_view, job_ctx):
    r = trace(tiny_view, job_ctx, method="grad_act", max_target_tokens=3)
    ids = fed_ids(tiny_view, PROMPT, [0])
    greedy = []
    with torch.no_grad():
        for _ in range(3):
            token = int(tiny_view.model(input_ids=ids).logits[0, -1].argmax())
            greedy.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    assert r["target_source"] == "greedy" and r["target_ids"] == greedy
    assert r["target_value"] == pytest.approx(target_score(tiny_view, PROMPT, greedy), abs=1e-4)


@pytest.mark.slow
def test_default_model_greedy_target_and_rollout(default_view, job_ctx):
    r = run_trace(default_view, TraceSpec(prompt="The capital of France is", method="attention_rollout",
                                          plots=False), job_ctx)
    assert r["target"] == " Paris" and r["target_value"] > np.log(0.3)
    matrix = np.array(r["rollout_matrix"])
    assert np.allclose(matrix.sum(-1), 1.0) and np.all(np.triu(matrix, 1) == 0.0)


# --- differences, determinism, hygiene --------------------------------------------------------------------------
def test_results_differ_for_prompts_and_models(tiny_view, tiny_view_b, job_ctx):
    a = trace(tiny_view, job_ctx, target=" Paris", n_steps=16)
    b = trace(tiny_view, job_ctx, target=" Paris", n_steps=16, prompt="The capital of Spain is a city named")
    c = trace(tiny_view_b, job_ctx, target=" Paris", n_steps=16)
    assert a["tokens"] != b["tokens"] and a["token_attributions"] != b["token_attributions"]
    assert a["tokens"] == c["tokens"] and a["target_value"] != c["target_value"]
    assert not np.allclose(a["token_attributions"], c["token_attributions"], rtol=0.05)
    d = trace(tiny_view, job_ctx, method="attention_rollout")
    e = trace(tiny_view_b, job_ctx, method="attention_rollout")
    assert not np.allclose(d["token_attributions"], e["token_attributions"])


def test_deterministic_and_leaves_the_model_as_it_was(tiny_view, job_ctx):
    weights = {k: v.clone() for k, v in tiny_view.model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in tiny_view.model.parameters()]
    attn_impl, before = tiny_view.model.config._attn_implementation, hooks(tiny_view)
    a = trace(tiny_view, job_ctx, n_steps=16)
    b = trace(tiny_view, job_ctx, n_steps=16)
    assert a["token_attributions"] == b["token_attributions"] and a["head_attributions"] == b["head_attributions"]
    assert all(torch.equal(v, weights[k]) for k, v in tiny_view.model.state_dict().items())
    after = [p.grad for p in tiny_view.model.parameters()]  # the engine never accumulates into .grad
    assert all(g is None if g0 is None else torch.equal(g, g0) for g, g0 in zip(after, grads))
    assert hooks(tiny_view) == before
    assert tiny_view.model.config._attn_implementation == attn_impl


def test_runs_under_a_callers_inference_mode(tiny_view, job_ctx):
    expected = trace(tiny_view, job_ctx, n_steps=16)
    with torch.inference_mode():
        r = trace(tiny_view, job_ctx, n_steps=16)
    assert r["token_attributions"] == expected["token_attributions"]


def test_progress_reaches_one(tiny_view, tmp_path):
    seen = []
    ctx = JobContext(tmp_path, on_progress=lambda f, m: seen.append(f))
    trace(tiny_view, ctx, n_steps=16)
    assert seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 3


def test_cancel_raises_job_cancelled_and_cleans_up(tiny_view, tmp_path):
    attn_impl, before = tiny_view.model.config._attn_implementation, hooks(tiny_view)
    ctx = JobContext(tmp_path)
    ctx.cancel()
    with pytest.raises(JobCancelled):
        trace(tiny_view, ctx)
    mid = JobContext(tmp_path, on_progress=lambda f, m: mid.cancel() if "integrated" in m else None)
    with pytest.raises(JobCancelled):
        trace(tiny_view, mid)
    assert hooks(tiny_view) == before and tiny_view.model.config._attn_implementation == attn_impl


@pytest.mark.parametrize("fields, message", [
    ({"prompt": ""}, "prompt` is empty"),
    ({"prompt": "   \n"}, "prompt` is empty"),
    ({"method": "saliency"}, "Unknown method `saliency`"),
    ({"baseline": "noise"}, "Unknown baseline"),
    ({"target_fn": "prob"}, "Unknown target_fn"),
    ({"n_steps": 0}, "`n_steps` must be an integer from 1"),
    ({"batch_size": 0}, "`batch_size` must be"),
    ({"max_target_tokens": 0}, "`max_target_tokens` must be"),
    ({"tolerance": 1.5}, "`tolerance` must be"),
    ({"target": ""}, "`target` is empty"),
    ({"baseline": "token"}, "needs `baseline_token_id`"),
    ({"baseline": "token", "baseline_token_id": 10**9}, "needs `baseline_token_id`"),
])
def test_bad_spec_raises_a_clear_value_error(tiny_view, job_ctx, fields, message):
    with pytest.raises(ValueError, match=message):
        trace(tiny_view, job_ctx, **fields)


def test_spec_decodes_from_json_with_defaults():
    spec = msgspec.convert({"prompt": "hi", "model": "ignored"}, TraceSpec)
    assert (spec.method, spec.baseline, spec.target, spec.max_target_tokens) == ("integrated_gradients", "zero",
                                                                                 None, 1)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"prompt": "hi", "method": "saliency"}, TraceSpec)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({}, TraceSpec)


@pytest.mark.parametrize("method", ["grad_act", "attention_rollout"])
def test_artifacts_exist_and_are_valid(tiny_view, job_ctx, method):
    r = trace(tiny_view, job_ctx, method=method, plots=True)
    assert r["artifacts"][0] == "trace.json" and "trace_tokens.png" in r["artifacts"]
    assert json.loads((job_ctx.artifact_dir / "trace.json").read_text()) == json.loads(json.dumps(r))
    for name in r["artifacts"][1:]:
        assert (job_ctx.artifact_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
