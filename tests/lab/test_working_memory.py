"""A Lab job's working memory is estimated before it is queued (lab_engines.working_memory, pure arithmetic
tested without a model), and a spec within every bound that needs more than the budget has free is a 400
naming the field that weighs most, with no job created; ordinary specs still run on a small budget."""
from __future__ import annotations

import httpx
import msgspec
import pytest

from lab_engines.causal_spec import CausalSpec
from lab_engines.diagnostics_spec import DiagnosticsSpec
from lab_engines.trace_spec import TraceSpec
from lab_engines.working_memory import ModelDims, responsible_field, tokens, working_memory

MiB = 1 << 20
# SmolLM2-135M, the default model, as its GGUF header gives it (test_default_model_dims reads it)
SMOL = ModelDims(n_layers=30, d_model=576, n_heads=9, n_kv_heads=3, head_dim=64, d_ff=1536, vocab=49152, n_ctx=8192)
CLEAN = "The Eiffel Tower is in the city of"
PATCH = {"clean": CLEAN, "corrupt": "The Colosseum is in the city of"}
NOISE = {"clean": CLEAN, "noise": {"subject": "Eiffel Tower"}}
SPEC_TYPES = {"causal_test": CausalSpec, "trace": TraceSpec, "diagnostics": DiagnosticsSpec}


def estimate(kind: str, dims: ModelDims = SMOL, **body) -> int:
    return working_memory(kind, msgspec.convert(body, SPEC_TYPES[kind]), dims)


def culprit(kind: str, dims: ModelDims = SMOL, **body) -> str:
    return responsible_field(kind, msgspec.convert(body, SPEC_TYPES[kind]), dims)


# --- the estimate ------------------------------------------------------------------------------------------------
def test_default_model_dims_come_from_the_gguf_header(default_gguf):
    from adapters.hf_files import gguf_shape

    assert ModelDims.from_config(gguf_shape(default_gguf)[2]) == SMOL


def test_dims_from_a_transformers_config():
    config = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "intermediate_size": 128, "vocab_size": 49152, "max_position_embeddings": 512}
    assert ModelDims.from_config(config) == ModelDims(2, 64, 4, 2, 16, 128, 49152, 512)
    gpt2 = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
    assert ModelDims.from_config(gpt2) == ModelDims(12, 768, 12, 12, 64, 3072, 50257, 1024)
    assert ModelDims.from_config({"text_config": config, "architectures": ["X"]}).n_layers == 2
    with pytest.raises(ValueError):
        ModelDims.from_config({"hidden_size": 64})


@pytest.mark.parametrize("kind, base, field, values", [
    ("causal_test", PATCH, "batch_size", [1, 16, 256]),
    ("causal_test", PATCH, "clean", [CLEAN, CLEAN * 8, CLEAN * 64]),
    ("causal_test", PATCH, "layers", [[0], list(range(10)), None]),
    ("causal_test", PATCH, "sites", [["heads"], ["resid"], ["resid", "heads", "attn", "mlp"]]),
    ("causal_test", NOISE, "noise", [{"subject": "Eiffel", "samples": s} for s in (1, 10, 64, 256)]),
    ("causal_test", NOISE, "window", [1, 10, 30]),
    ("causal_test", {"clean": CLEAN, "intervention": "ablate"}, "clean", [CLEAN, CLEAN * 8, CLEAN * 64]),
    ("causal_test", {"clean": CLEAN, "intervention": "ablate"}, "ablation", [["zero"], ["zero", "mean"]]),
    ("causal_test", {"clean": CLEAN, "intervention": "ablate"}, "reference", [None, [CLEAN * 40], [CLEAN * 400]]),
    ("causal_test", {"positive": ["a"], "negative": ["b"], "intervention": "steer", "clean": CLEAN}, "max_tokens",
     [1, 20, 512]),
    ("trace", {"prompt": CLEAN}, "prompt", [CLEAN, CLEAN * 8, CLEAN * 64]),
    ("trace", {"prompt": CLEAN}, "n_steps", [16, 512, 4096]),
    ("trace", {"prompt": CLEAN}, "batch_size", [1, 32, 256]),
    ("trace", {"prompt": CLEAN}, "max_target_tokens", [1, 8, 64]),
    ("trace", {"prompt": CLEAN, "method": "attention_rollout"}, "prompt", [CLEAN, CLEAN * 8, CLEAN * 64]),
    ("trace", {"prompt": CLEAN, "method": "grad_act"}, "prompt", [CLEAN, CLEAN * 8, CLEAN * 64]),
    ("diagnostics", {"sections": ["heads"]}, "repeat_len", [10, 100, 1000]),
    ("diagnostics", {"sections": ["heads"]}, "mode", ["quick", "full"]),
    ("diagnostics", {"sections": ["memorization"]}, "texts", [[CLEAN], [CLEAN * 100], [CLEAN * 900]]),
    ("diagnostics", {"sections": ["memorization"], "canaries": ["My PIN is 1234 5678 and my code 99"]},
     "n_controls", [1, 100, 10000]),
])
def test_the_estimate_grows_with_the_fields_it_depends_on(kind, base, field, values):
    sizes = [estimate(kind, **{**base, field: value}) for value in values]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1], (field, sizes)


def test_the_estimate_grows_with_the_model():
    small = ModelDims(2, 64, 4, 2, 16, 128, 49152, 512)
    for kind, body in (("causal_test", PATCH), ("causal_test", NOISE), ("trace", {"prompt": CLEAN}),
                       ("diagnostics", {})):
        assert estimate(kind, small, **body) < estimate(kind, SMOL, **body), kind


def test_default_model_numbers_stay_ordinary():
    """What the README quotes; ordinary specs need tens to a few hundred MiB on the default model."""
    patch = estimate("causal_test", **PATCH)
    noise = estimate("causal_test", clean=CLEAN, noise={"subject": "Eiffel Tower", "samples": 64})
    assert 16 * MiB < patch < 100 * MiB and patch < noise < 600 * MiB, (patch >> 20, noise >> 20)
    assert estimate("trace", prompt=CLEAN) < 1536 * MiB
    assert estimate("diagnostics") < 1024 * MiB
    assert tokens(CLEAN, SMOL) == 19 and tokens("x" * 10**6, SMOL) == SMOL.n_ctx


@pytest.mark.parametrize("kind, body, field", [
    ("causal_test", {**NOISE, "noise": {"subject": "Eiffel Tower", "samples": 256}}, "noise.samples"),
    ("causal_test", {**PATCH, "clean": "The Eiffel Tower " * 500, "corrupt": "The Colosseum " * 500}, "clean"),
    ("causal_test", {**PATCH, "corrupt": "The Colosseum " * 900}, "corrupt"),
    ("causal_test", {"clean": CLEAN * 200, "intervention": "ablate"}, "clean"),
    ("causal_test", {"clean": CLEAN, "intervention": "ablate", "reference": [CLEAN * 900]}, "reference"),
    ("trace", {"prompt": CLEAN * 900, "method": "attention_rollout"}, "prompt"),
    ("trace", {"prompt": CLEAN, "n_steps": 4096, "batch_size": 256}, "batch_size"),
    ("diagnostics", {"repeat_len": 4000}, "repeat_len"),
    ("diagnostics", {"sections": ["memorization"], "texts": [CLEAN * 900]}, "texts"),
])
def test_the_field_that_weighs_most_is_named(kind, body, field):
    assert culprit(kind, **body) == field


def test_a_spec_at_its_typical_values_blames_the_model():
    pytest.importorskip("torch")
    from lab_engines.snapshots import SnapshotSpec

    assert culprit("causal_test", **PATCH) == "model"
    assert responsible_field("snapshot", SnapshotSpec(), SMOL) == "model"


# --- through a live server ---------------------------------------------------------------------------------------
BUDGET = "200M"  # the tiny model's copy and ordinary jobs fit; big specs on the default model do not


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    pytest.importorskip("torch")
    from tests.conftest import LiveServer
    from tests.lab.test_lab_api import _workdir

    live = LiveServer(_workdir(tmp_path_factory.mktemp("lab-working-memory")), "--max-memory", BUDGET)
    with httpx.Client(base_url=live.base_url, timeout=120) as client:
        yield client
    live.stop()


def jobs(http) -> int:
    return len(http.get("/lab/jobs", params={"limit": 1000}).json()["data"])


ROUTES = {"causal_test": "/lab/causal_test", "trace": "/lab/trace", "diagnostics": "/lab/diagnostics/run"}


@pytest.mark.parametrize("kind, body, field", [
    ("causal_test", {**NOISE, "noise": {"subject": "Eiffel Tower", "samples": 256}}, "noise.samples"),
    ("causal_test", {"clean": CLEAN * 200, "intervention": "ablate"}, "clean"),
    ("trace", {"prompt": CLEAN * 900, "method": "attention_rollout"}, "prompt"),
    ("diagnostics", {"repeat_len": 4000}, "repeat_len"),
])
def test_a_job_too_large_for_the_budget_is_refused_naming_the_field(http, kind, body, field):
    """Within every bound, on the default model (its shape from the GGUF header; nothing is loaded)."""
    before = jobs(http)
    response = http.post(ROUTES[kind], json={"model": "default", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == "lab_job_too_large", error
    assert "MiB" in error["message"] and f"`{field}`" in error["message"]
    assert jobs(http) == before


def test_ordinary_jobs_still_run_on_the_small_budget(http):
    from tests.lab.test_lab_api import submit, wait

    for kind, body in (("causal_test", {**PATCH, "sites": ["resid"], "answer": " Paris", "corrupt_answer": " Rome"}),
                       ("trace", {"prompt": CLEAN}),
                       ("causal_test", {**NOISE, "noise": {"subject": "Eiffel Tower", "samples": 3}})):
        job = wait(http, submit(http, ROUTES[kind], model="tiny-hf", **body)["id"])
        assert job["status"] == "succeeded", job
    # the default model's copy alone does not fit this budget: refused at submit, naming the model
    refused = http.post("/lab/causal_test", json={"model": "default", **PATCH})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model", refused.text
