"""The teach engines (train_target, train_live) on the tiny seeded llama: exact invariants that need no
knowledge (token_bias's least biases, DPO's ln 2 at step 0, the LoRA file format, the automatic revert,
restore after a cancel or an error, the auto router's report) and every spec bound. The runs that need real
knowledge are in test_teach_default.py."""
from __future__ import annotations

import math

import msgspec
import pytest

torch = pytest.importorskip("torch")

from adapters.overlay import read_lora
from lab_engines import ENGINES
from lab_engines.context import JobCancelled, JobContext
from lab_engines.snapshots import weight_digests
from lab_engines.teach import METHODS, run_train_live, run_train_target
from lab_engines.teach_bias import solve_biases
from lab_engines.teach_spec import TrainLiveSpec, TrainTargetSpec
from lab_engines.teach_text import Prompt, apply_prompt_delta, greedy, prefix_prompt_delta
from lab_engines.working_memory import ModelDims, responsible_field, working_memory

PROMPT = "The little robot walked into the"
QUIET = {"regression_set": "none", "fluency_tokens": 4}  # the tiny model knows nothing: no shipped regression set


def hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def grad_flags(model) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


@pytest.fixture
def tiny(tiny_view):
    """The session's tiny model, checked unchanged after each test (the engines must restore it)."""
    before, flags, n_hooks = weight_digests(tiny_view), grad_flags(tiny_view.model), hooks(tiny_view.model)
    yield tiny_view
    assert weight_digests(tiny_view) == before
    assert grad_flags(tiny_view.model) == flags and hooks(tiny_view.model) == n_hooks


def target_spec(**fields) -> TrainTargetSpec:
    return msgspec.convert({"prompt": PROMPT, "target": " kitchen table", **QUIET, **fields}, TrainTargetSpec)


def random_text(view, n: int, seed: int) -> str:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 40000, (n,), generator=gen).tolist()
    return view.tokenizer.decode(ids)


# --- registration and bounds -------------------------------------------------------------------------------------
def test_registered_as_two_lab_kinds():
    assert ENGINES["train_target"].spec_type() is TrainTargetSpec
    assert ENGINES["train_live"].spec_type() is TrainLiveSpec
    assert ENGINES["train_target"].runner() is run_train_target and ENGINES["train_live"].runner() is run_train_live


def _bounded(info) -> bool:
    """A type with a bound: a constrained number / string / list, a Literal, a bool or a bounded struct."""
    mi = msgspec.inspect
    if isinstance(info, mi.UnionType):
        return all(_bounded(t) for t in info.types if not isinstance(t, mi.NoneType))
    if isinstance(info, (mi.LiteralType, mi.BoolType)):
        return True
    if isinstance(info, (mi.IntType, mi.FloatType)):
        return (info.ge is not None or info.gt is not None) and (info.le is not None or info.lt is not None)
    if isinstance(info, mi.StrType):
        return info.max_length is not None or info.pattern is not None
    if isinstance(info, mi.ListType):
        return info.max_length is not None and _bounded(info.item_type)
    if isinstance(info, mi.StructType):
        return all(_bounded(f.type) for f in info.fields)
    return False


@pytest.mark.parametrize("spec_type", [TrainTargetSpec, TrainLiveSpec])
def test_every_spec_field_has_a_bound(spec_type):
    fields = msgspec.inspect.type_info(spec_type).fields
    assert [f.name for f in fields if not _bounded(f.type)] == []


OUT_OF_BOUNDS = [  # (field, value): each just outside its bound
    ("prompt", "x" * 32_769), ("target", "t" * 1001), ("rejected", "r" * 1001), ("subject", "s" * 1001),
    ("method", "sft"), ("messages", [{"role": "user", "content": "hi"}] * 65),
    ("messages", [{"role": "robot", "content": "hi"}]), ("paraphrases", ["p"] * 65),
    ("neighbors", [{"prompt": "n"}] * 65), ("neighbors", [{"prompt": "n", "answer": "a" * 1001}]),
    ("regression_extra", [{"prompt": "n"}] * 65), ("regression_set", "mine"),
    ("bias_margin", -0.1), ("bias_margin", 20.5), ("layer", -1), ("layer", 4096),
    ("rome_steps", 0), ("rome_steps", 501), ("rome_lr", 0.0), ("rome_lr", 10.5), ("kl_factor", -1), ("kl_factor", 101),
    ("rome_weight_decay", -1), ("rome_weight_decay", 101), ("clamp_norm_factor", 0), ("clamp_norm_factor", 101),
    ("rank", 0), ("rank", 65), ("alpha", 0), ("alpha", 4097), ("steps", 0), ("steps", 2001), ("lr", 0), ("lr", 1.5),
    ("modules", []), ("modules", ["mlp.fc1"]), ("modules", ["mlp.down_proj"] * 8), ("layers", []), ("layers", [-1]),
    ("layers", [4096]), ("beta", 0), ("beta", 101), ("coefficient", -101), ("coefficient", 101),
    ("grad_clip", 0), ("grad_clip", 1001), ("max_delta_norm", 0), ("max_delta_norm", 11),
    ("answer_tokens", 0), ("answer_tokens", 65), ("fluency_tokens", -1), ("fluency_tokens", 257),
    ("regression_threshold", -0.1), ("regression_threshold", 1.1), ("seed", -1), ("base_sha256", "abc"),
    ("auto_methods", []), ("auto_methods", ["steer"]), ("auto_methods", ["lora"] * 6),
]


@pytest.mark.parametrize("field, value", OUT_OF_BOUNDS)
def test_each_bound_is_enforced_naming_the_field(field, value):
    body = {"prompt": "p", "target": " t", field: value}
    with pytest.raises(msgspec.ValidationError, match=rf"\$\.{field}\b"):
        msgspec.convert(body, TrainTargetSpec)


def test_bounds_of_train_live_and_specs_built_in_python(tiny, job_ctx):
    for field, value in (("corrections", [{"prompt": "p", "good": " g"}] * 257), ("method", "rome"),
                         ("corrections", [{"prompt": "p", "good": "g" * 1001}]), ("auto_methods", ["rome"])):
        with pytest.raises(msgspec.ValidationError, match=rf"\$\.{field}"):
            msgspec.convert({field: value}, TrainLiveSpec)
    with pytest.raises(ValueError, match="rank"):  # a spec made in Python meets the same bounds
        run_train_target(tiny, TrainTargetSpec(prompt="p", target=" t", rank=0), job_ctx)


@pytest.mark.parametrize("fields, message", [
    ({"prompt": ""}, "prompt"), ({"target": ""}, "target"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "not both"),
    ({"prompt": "", "messages": [{"role": "assistant", "content": "hi"}]}, "user message"),
    ({"method": "steer", "layer": 0}, "layer 0"), ({"method": "lora", "layers": [2]}, "layers"),
    ({"method": "rome", "subject": "giraffe", "layer": 1}, "subject"), ({"method": "lora", "subject": "robot"}, "rome"),
])
def test_input_that_cannot_work_is_a_value_error_and_the_copy_stays(tiny, job_ctx, fields, message):
    with pytest.raises(ValueError, match=message):
        run_train_target(tiny, target_spec(**fields), job_ctx)


# --- prompt deltas -----------------------------------------------------------------------------------------------
def test_prompt_delta_rendering():
    user = [{"role": "user", "content": "Hi?"}]
    assert apply_prompt_delta(user, "Be brief.") == [{"role": "system", "content": "Be brief."}, *user]
    system = [{"role": "system", "content": "You are kind."}, *user]
    assert apply_prompt_delta(system, "Be brief.")[0] == {"role": "system", "content": "You are kind.\nBe brief."}
    assert apply_prompt_delta(system, "") == system and system[0]["content"] == "You are kind."
    assert prefix_prompt_delta("The sky is", "Fact: the sky is green.") == "Fact: the sky is green.\nThe sky is"


# --- token_bias --------------------------------------------------------------------------------------------------
def test_token_bias_makes_greedy_give_exactly_the_target_with_the_least_biases(tiny, job_ctx):
    """One token: the tiny model's logits are nearly flat (std 0.16), so two target tokens compete at each
    other's positions and no position-independent bias separates them (test_bias_solver_reports_conflicts;
    test_teach_default.py biases a multi-token target on the default model)."""
    result = run_train_target(tiny, target_spec(method="token_bias", target=" kitchen"), job_ctx)
    assert result["method"] == "token_bias" and not result["reverted"] and result["restored_identical"]
    (component,) = result["components"]
    assert component["kind"] == "token_bias" and component["weight"] == 1.0
    bias = {int(k): v for k, v in component["bias"].items()}
    assert bias and all(0 < v <= 100 for v in bias.values())
    prompt_ids = tiny.encode(PROMPT)[0].tolist()
    target = tiny.tokenizer(" kitchen", add_special_tokens=False)["input_ids"]
    vector = torch.zeros(tiny.vocab_size)
    for token, value in bias.items():
        vector[token] = value
    assert greedy(tiny, prompt_ids, len(target), vector, stop_at_eos=False) == target
    assert greedy(tiny, prompt_ids, len(target), None, stop_at_eos=False) != target
    assert result["report"]["efficacy"]["greedy"] == 1.0 and result["report"]["fixed"]
    # least: each bias is tight somewhere (lowering it by more than the margin loses a position)
    with torch.no_grad():
        logits = tiny.logits(torch.tensor([prompt_ids + target]))[0, len(prompt_ids) - 1:-1]
    for token in bias:
        lower = {**bias, token: bias[token] - 1.0 - 1e-3}  # bias_margin is 1.0
        shifted = logits.clone()
        for t, value in lower.items():
            shifted[:, t] += value
        assert not all(shifted[i].argmax() == target[i] for i in range(len(target))), token


def test_bias_solver_reports_conflicts():
    logits = [torch.tensor([5.0, 3.0, 0.0]), torch.tensor([5.0, 0.0, 3.0])]  # targets 1 then 2
    bias, problem = solve_biases(logits, [1, 2], margin=1.0)
    assert problem is None and bias == {1: 3.0, 2: 3.0}
    _bias, problem = solve_biases([torch.tensor([0.0, 0.0, 300.0])], [1], margin=1.0)
    assert "more than 100" in problem
    same = torch.tensor([0.0, 1.0, 0.0])  # the same logits, two different targets: no bias can satisfy both
    _bias, problem = solve_biases([same, same], [1, 2], margin=1.0)
    assert "conflict" in problem


def test_token_bias_on_chat_messages(tiny, job_ctx):
    spec = target_spec(prompt="", messages=[{"role": "user", "content": "Where did the robot go?"}], target="Home",
                       method="token_bias")
    result = run_train_target(tiny, spec, job_ctx)
    prompt = Prompt(messages=({"role": "user", "content": "Where did the robot go?"},))
    assert prompt.render(tiny).endswith("<|im_start|>assistant\n")
    assert result["report"]["fixed"] and result["report"]["efficacy"]["cases"][0]["answer_after"].startswith("Home")


# --- lora and dpo ------------------------------------------------------------------------------------------------
def test_lora_writes_overlay_format_on_the_selected_modules_and_layers(tiny, job_ctx):
    spec = target_spec(method="lora", modules=["self_attn.q_proj", "mlp.down_proj"], layers=[1], rank=2, alpha=8,
                       lr=0.02, steps=15)
    result = run_train_target(tiny, spec, job_ctx)
    (component,) = result["components"]
    assert component == {"kind": "lora", "weight": 1.0, "file": "lora.safetensors", "rank": 2, "alpha": 8.0,
                         "modules": ["self_attn.q_proj", "mlp.down_proj"], "layers": [1]}
    pairs = read_lora(job_ctx.artifact_dir / component["file"])
    assert set(pairs) == {(1, "self_attn.q_proj"), (1, "mlp.down_proj")}
    a, b = pairs[(1, "mlp.down_proj")]
    assert a.shape == (2, 128) and b.shape == (64, 2)
    from safetensors import safe_open

    with safe_open(str(job_ctx.artifact_dir / component["file"]), "np") as f:
        assert f.metadata()["rank"] == "2" and float(f.metadata()["alpha"]) == 8.0
    # the file, applied as adapters/overlay.py says (W + alpha/rank · B A), gives what the engine measured
    details, case = result["report"]["details"], result["report"]["efficacy"]["cases"][0]
    assert details["relative_delta_max"] <= spec.max_delta_norm + 1e-6
    prompt_ids = tiny.encode(PROMPT)[0]
    target = torch.tensor(tiny.tokenizer(" kitchen table", add_special_tokens=False)["input_ids"])
    ids, n = torch.cat([prompt_ids, target]), len(prompt_ids)
    saved = {}
    with torch.no_grad():
        for (layer, module), (a, b) in pairs.items():
            weight = tiny.layers[layer].get_submodule(module).weight
            saved[(layer, module)] = weight.clone()
            weight += 4.0 * torch.from_numpy(b) @ torch.from_numpy(a)
        logp = torch.log_softmax(tiny.logits(ids[None])[0, n - 1:-1], dim=-1)
        after = float(logp.gather(1, target[:, None]).mean())
        for key, weight in saved.items():
            tiny.layers[key[0]].get_submodule(key[1]).weight.copy_(weight)
    assert after == pytest.approx(case["target_logprob"]["after"], abs=1e-3)
    assert after > case["target_logprob"]["before"]
    # the distance gate held the change at max_delta_norm (0.1 of ||W||): the tiny model moves little (its logits
    # are nearly flat); test_teach_default.py measures a fact's move on the default model
    assert details["capped_module_steps"] > 0 and details["clipped_steps"] > 0


def test_dpo_starts_at_ln2_and_ends_with_a_positive_margin(tiny, job_ctx):
    spec = target_spec(method="dpo", rejected=" garden gate", lr=0.02, steps=12, beta=0.5)
    result = run_train_target(tiny, spec, job_ctx)
    details = result["report"]["details"]
    assert details["loss_step0"] == pytest.approx(math.log(2), abs=1e-4)
    assert details["margin_curve"][0] == 0.0
    assert details["final"]["margin"] > 0 and details["final"]["accuracy"] == 1.0
    assert details["loss_curve"][-1] < math.log(2)
    assert result["components"][0]["kind"] == "lora" and result["restored_identical"]
    with pytest.raises(ValueError, match="already answers"):  # nothing to prefer: the rejected answer is the target
        run_train_target(tiny, target_spec(method="dpo", rejected=" kitchen table"), job_ctx)


# --- the automatic revert ----------------------------------------------------------------------------------------
def test_a_harmful_run_is_reverted_and_the_copy_hashes_as_before(tiny, job_ctx):
    """Random-token targets trained hard: the prompts the model answered (greedy references) break."""
    before = weight_digests(tiny)
    corrections = [{"prompt": f"Story {i}: the robot said", "good": random_text(tiny, 4, i)} for i in range(4)]
    references = [{"prompt": t} for t in ("Once upon a time", "The weather is", "My name is", "Two plus two",
                                          "The cat sat on", "In the morning", "She opened the", "We went to")]
    spec = msgspec.convert({"corrections": corrections, "method": "lora", "lr": 0.05, "steps": 12, "alpha": 16,
                            "max_delta_norm": 10.0, "grad_clip": 1000.0, "regression_set": "none",
                            "regression_extra": references, "fluency_tokens": 4}, TrainLiveSpec)
    result = run_train_live(tiny, spec, job_ctx)
    assert result["reverted"] and "regression set degraded" in result["revert_reason"]
    assert result["components"] == [] and result["restored_identical"]
    regression = result["report"]["specificity"]["regression"]
    assert regression["broken_fraction"] > spec.regression_threshold
    assert weight_digests(tiny) == before
    assert not list(job_ctx.artifact_dir.glob("*.safetensors"))


# --- restore on cancel and on error ------------------------------------------------------------------------------
@pytest.mark.parametrize("method, at", [("lora", "lora: step 3"), ("rome", "rome: evaluating"),
                                        ("rome", "rome: optimising")])
def test_a_cancel_stops_the_run_and_leaves_the_copy_restored(tiny, tmp_path, method, at):
    """rome: evaluating is when the down-projection is edited in place."""
    seen = []

    def progress(fraction, message):
        seen.append(message)
        if message.startswith(at):
            ctx.cancel()

    ctx = JobContext(tmp_path / "job", progress)
    spec = target_spec(method=method, steps=20, lr=0.01, layer=1, **({"subject": "robot"} if method == "rome" else {}))
    with pytest.raises(JobCancelled):
        run_train_target(tiny, spec, ctx)
    assert any(m.startswith(at) for m in seen)  # the fixture checks hashes, grad flags and hooks


def test_an_error_mid_run_still_restores(tiny, job_ctx, monkeypatch):
    def broken(job):
        weight = job.view.layers[0].mlp.down_proj.weight
        job.guard.save("model.layers.0.mlp.down_proj.weight", weight)
        with torch.no_grad():
            weight.mul_(2.0)
        job.view.layers[1].register_forward_hook(lambda *args: None)  # a stray hook
        raise RuntimeError("boom")

    monkeypatch.setitem(METHODS, "lora", broken)
    with pytest.raises(RuntimeError, match="boom"):
        run_train_target(tiny, target_spec(method="lora"), job_ctx)


# --- auto --------------------------------------------------------------------------------------------------------
def test_auto_takes_the_cheapest_method_that_works_and_says_why(tiny, job_ctx):
    result = run_train_target(tiny, target_spec(method="auto", target=" kitchen"), job_ctx)
    attempts = result["report"]["attempts"]
    assert result["method"] == "token_bias" and attempts[0]["status"] == "won"
    assert [a["status"] for a in attempts[1:]] == ["not_tried"] * 4
    assert all("token_bias won first" in a["reason"] for a in attempts[1:])


def test_auto_reports_skipped_and_failed_methods(tiny, job_ctx):
    spec = target_spec(method="auto", auto_methods=["dpo", "prompt", "lora"], target=" kitchen", rejected=" kitchen",
                       lr=0.05, steps=30, max_delta_norm=1.0)
    result = run_train_target(tiny, spec, job_ctx)
    attempts = {a["method"]: a for a in result["report"]["attempts"]}
    assert attempts["dpo"]["status"] == "skipped" and "already answers" in attempts["dpo"]["reason"]
    assert attempts["prompt"]["status"] == "not_fixed"
    assert "greedy does not give the target" in attempts["prompt"]["reason"]
    assert attempts["lora"]["status"] == "won" and result["method"] == "lora"
    assert result["components"][0]["kind"] == "lora" and result["report"]["fixed"]


def test_auto_with_nothing_that_works_is_reverted(tiny, job_ctx):
    spec = target_spec(method="auto", auto_methods=["prompt"])
    result = run_train_target(tiny, spec, job_ctx)
    assert result["reverted"] and result["method"] is None and result["components"] == []
    assert "prompt not_fixed" in result["revert_reason"]


# --- steering ----------------------------------------------------------------------------------------------------
def test_steer_writes_a_vector_for_layer_one_or_more(tiny, job_ctx):
    result = run_train_target(tiny, target_spec(method="steer", layer=1, coefficient=2.0), job_ctx)
    (component,) = result["components"]
    assert component["kind"] == "steering" and component["layer"] == 1 and component["coefficient"] == 2.0
    from safetensors.numpy import load_file

    vector = load_file(str(job_ctx.artifact_dir / component["file"]))["vector"]
    assert vector.shape == (64,) and vector.dtype.name == "float32"


# --- working memory ----------------------------------------------------------------------------------------------
SMOL = ModelDims(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536, vocab=49152, n_ctx=8192)


def test_working_memory_of_teach_jobs():
    def estimate(kind, spec_type, **body):
        return working_memory(kind, msgspec.convert(body, spec_type), SMOL)

    fact = {"prompt": "The capital of France is", "target": " Rome"}
    sizes = {m: estimate("train_target", TrainTargetSpec, method=m, **fact) for m in
             ("token_bias", "prompt", "rome", "lora", "dpo", "steer", "auto")}
    assert sizes["auto"] == max(sizes.values()) and sizes["token_bias"] < sizes["rome"] < 600 << 20, sizes
    grow = [estimate("train_target", TrainTargetSpec, method="lora", prompt="The capital of France is " * k,
                     target=" Rome") for k in (1, 30, 300)]
    assert grow == sorted(grow) and grow[0] < grow[-1]
    assert estimate("train_target", TrainTargetSpec, method="lora", rank=64, **fact) > sizes["lora"]
    big = msgspec.convert({"corrections": [{"prompt": "The capital of France is " * 300, "good": " Rome"}] * 64,
                           "method": "lora"}, TrainLiveSpec)
    assert responsible_field("train_live", big, SMOL) == "corrections"
