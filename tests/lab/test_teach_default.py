"""The teach engines on the default model (SmolLM2-135M-Instruct in torch): what needs real knowledge. The
assertions are measured effects on this model, not world knowledge (numbers in README.md's Lab section).
Each run restores the session's shared model; the fixture checks every tensor's hash."""
from __future__ import annotations

import msgspec
import pytest

torch = pytest.importorskip("torch")

from adapters.overlay import read_lora
from lab_engines.snapshots import weight_digests
from lab_engines.teach import run_train_target
from lab_engines.teach_spec import TrainTargetSpec
from lab_engines.teach_text import greedy

FRANCE = "The capital of France is"
UNRELATED = ("My favourite hobby is", "The recipe calls for two cups of")
# KL(before || after) of the next token on unrelated prompts after the ROME edit below (layer 3): measured 0.0068
# mean and 0.0176 max over teach_eval.KL_PROMPTS, 0.0015 and 0.0117 on UNRELATED; the bound leaves ~3x headroom
# (a harmful edit is far above it: the steering run that broke 20 regression items had 0.43 mean, 0.78 max)
ROME_KL_BOUND = 0.05


@pytest.fixture
def smol(default_view):
    before = weight_digests(default_view)
    yield default_view
    assert weight_digests(default_view) == before


def spec(**fields) -> TrainTargetSpec:
    return msgspec.convert({"fluency_tokens": 4, **fields}, TrainTargetSpec)


def next_logprobs(view, text: str) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(view.logits(view.encode(text))[0, -1], dim=-1)


@pytest.mark.slow
def test_rome_is_rank_one_flips_the_target_and_keeps_unrelated_prompts(smol, job_ctx):
    result = run_train_target(smol, spec(prompt=FRANCE, target=" Rome", method="rome",
                                         paraphrases=["The capital city of France is"],
                                         neighbors=[{"prompt": "The capital of Germany is"}]), job_ctx)
    assert result["method"] == "rome" and not result["reverted"] and result["restored_identical"]
    details, case = result["report"]["details"], result["report"]["efficacy"]["cases"][0]
    assert details["subject"] == "France" and details["rank"] == 1 and details["covariance"] == "identity (C = I)"
    assert case["greedy"] == {"before": False, "after": True} and case["target_rank"]["after"] == 0
    assert case["target_logprob"]["after"] > case["target_logprob"]["before"] + 3
    assert result["report"]["specificity"]["kl"]["max"] < ROME_KL_BOUND

    (component,) = result["components"]
    assert component["kind"] == "lora" and component["rank"] == 1 and component["alpha"] == 1.0
    assert component["modules"] == ["mlp.down_proj"] and component["layers"] == [details["layer"]]
    ((layer, module), (a, b)), = read_lora(job_ctx.artifact_dir / component["file"]).items()
    assert a.shape == (1, smol.mlp(layer).down_proj.in_features) and b.shape == (smol.d_model, 1)
    delta = torch.from_numpy(b) @ torch.from_numpy(a)
    assert torch.linalg.matrix_rank(delta) == 1

    # the file, applied as a LoRA of scale 1, is the edit: the prompt flips, unrelated prompts stay
    weight = smol.mlp(layer).down_proj.weight
    before = [next_logprobs(smol, t) for t in UNRELATED]
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight += delta
        rome = smol.tokenizer(" Rome", add_special_tokens=False)["input_ids"]
        assert greedy(smol, smol.encode(FRANCE)[0].tolist(), 1) == rome
        for text, base in zip(UNRELATED, before):
            after = next_logprobs(smol, text)
            assert float((base.exp() * (base - after)).sum()) < ROME_KL_BOUND
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@pytest.mark.slow
def test_lora_on_a_new_fact_raises_its_logprob_by_more_than_a_nat(smol, job_ctx):
    """The default knobs (rank 4, alpha 4, lr 2e-4, at most 40 steps, mlp.down_proj + up_proj of every layer):
    measured -3.25 -> -0.68 (greedy now answers it) after 27 steps, ~40 s on one core."""
    result = run_train_target(smol, spec(prompt="The pet dragon of Professor Quillby is named", target=" Ember",
                                         method="lora", regression_set="none", fluency_tokens=0), job_ctx)
    case = result["report"]["efficacy"]["cases"][0]
    assert case["target_logprob"]["after"] - case["target_logprob"]["before"] > 1.0
    assert result["components"][0]["kind"] == "lora" and result["restored_identical"]


def test_token_bias_gives_a_multi_token_target_exactly(smol, job_ctx):
    target = " Rome, Italy"
    result = run_train_target(smol, spec(prompt=FRANCE, target=target, method="token_bias", regression_set="none"),
                              job_ctx)
    (component,) = result["components"]
    vector = torch.zeros(smol.vocab_size)
    for token, value in component["bias"].items():
        vector[int(token)] = value
    ids = smol.tokenizer(target, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and greedy(smol, smol.encode(FRANCE)[0].tolist(), len(ids), vector) == ids
    assert result["report"]["details"]["verified_by_greedy"] and result["restored_identical"]
