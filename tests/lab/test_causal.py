"""The causal engine (lab_engines.causal): activation patching, causal tracing, ablation, steering.
Invariants that hold exactly on the tiny seeded llamas, and the expected picture on the default model
(SmolLM2-135M: "The Eiffel Tower / The Colosseum is in the city of" -> " Paris" / " Rome")."""
from __future__ import annotations

import copy
import hashlib
import json

import msgspec
import pytest

torch = pytest.importorskip("torch")

from lab_engines.ablation import ablation_edit
from lab_engines.causal import CausalSpec, NoiseSpec, run_causal
from lab_engines.causal_runs import add, put
from lab_engines.causal_tracing import window_layers
from lab_engines.context import JobCancelled, JobContext
from lab_engines.model_access import capture, intervene
from lab_engines.steering import VECTOR_FILE

CLEAN = "The Eiffel Tower is in the city of"
CORRUPT = "The Colosseum is in the city of"  # same 9 tokens; positions 1-3 differ
PATCH = {"clean": CLEAN, "corrupt": CORRUPT, "answer": " Paris", "corrupt_answer": " Rome"}
NOISE = {"clean": CLEAN, "noise": {"subject": "Eiffel Tower", "samples": 3}}
ABLATE = {"intervention": "ablate", "clean": CLEAN, "answer": " Paris", "corrupt_answer": " Rome"}
STEER = {"intervention": "steer", "prompt": "I think that", "positive": ["I love it", "wonderful"],
         "negative": ["I hate it", "terrible"], "max_tokens": 8}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The test machine's 2 cores are shared: OpenMP with 2 threads on busy cores measured 2-10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(view, ctx, **body) -> dict:
    return run_causal(view, msgspec.convert(body, CausalSpec), ctx)


def fingerprint(view) -> str:
    """Weights digest plus a count of hooks left anywhere: both must be unchanged by every run."""
    digest = hashlib.sha256()
    for name, tensor in sorted(view.model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().contiguous().cpu().numpy().tobytes())
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in view.model.modules())
    return f"{digest.hexdigest()}:{hooks}"


def logits_of(view, text: str) -> torch.Tensor:
    with torch.no_grad():
        return view.logits(view.encode(text))


# --- activation patching ------------------------------------------------------------------------
def test_patching_clean_into_clean_is_bit_identical(tiny_view, job_ctx):
    ids = tiny_view.encode(CLEAN)
    keys = [("embed", 0)] + [(site, layer) for site in ("resid", "attn", "mlp", "heads")
                             for layer in range(tiny_view.n_layers)]
    with torch.no_grad(), capture(tiny_view, keys) as clean:
        reference = tiny_view.logits(ids)
    for key in keys:
        with torch.no_grad(), intervene(tiny_view, {key: put(clean[key], (slice(None),))}):
            assert torch.equal(tiny_view.logits(ids), reference), key
    result = run(tiny_view, job_ctx, clean=CLEAN, corrupt=CLEAN, metric="logprob", sites=["resid", "heads"])
    assert result["clean_metric"] == result["corrupt_metric"] and result["normalized"] is False
    for name in ("resid", "heads"):
        assert {v for row in result["grids"][name]["raw"] for v in row} == {result["clean_metric"]}


def test_patching_layer0_all_positions_restores_clean(tiny_view, job_ctx):
    with torch.no_grad(), capture(tiny_view, [("resid", 0)]) as clean:
        clean_logits = tiny_view.logits(tiny_view.encode(CLEAN))
    corrupt_logits = logits_of(tiny_view, CORRUPT)
    assert not torch.equal(corrupt_logits, clean_logits)
    with torch.no_grad(), intervene(tiny_view, {("resid", 0): put(clean[("resid", 0)], (slice(None),))}):
        assert torch.equal(tiny_view.logits(tiny_view.encode(CORRUPT)), clean_logits)

    result = run(tiny_view, job_ctx, **PATCH)
    resid = result["grids"]["resid"]
    assert result["clean_metric"] != result["corrupt_metric"]
    assert resid["all_positions"] == [1.0] * (tiny_view.n_layers + 1)  # embed and every layer, exactly
    assert resid["all_positions_raw"] == [result["clean_metric"]] * (tiny_view.n_layers + 1)
    assert resid["values"][-1][-1] == 1.0  # last layer, last position


def test_patching_grid_shapes_and_untouched_positions(tiny_view, job_ctx):
    result = run(tiny_view, job_ctx, **PATCH, sites=["resid", "heads", "attn", "mlp"])
    grids, n, seq = result["grids"], tiny_view.n_layers, 9
    assert len(result["tokens"]) == len(result["corrupt_tokens"]) == seq
    assert [len(grids["resid"]["values"]), len(grids["resid"]["values"][0])] == [n + 1, seq]
    assert [len(grids["heads"]["values"]), len(grids["heads"]["values"][0])] == [n, tiny_view.n_heads]
    for site in ("attn", "mlp"):
        assert [len(grids[site]["values"]), len(grids[site]["values"][0])] == [n, seq]
    # position 0 ("The") is the same in both prompts and sees nothing later: patching it does nothing
    for site in ("resid", "attn", "mlp"):
        assert all(row[0] == 0.0 for row in grids[site]["values"]), site
    # swapping the embedding of an identical token does nothing; of a changed token, something
    embed = grids["resid"]["values"][0]
    assert embed[4:] == [0.0] * 5 and all(v != 0.0 for v in embed[1:4])


def test_patching_cells_match_single_patches(tiny_view, job_ctx):
    """Grid row i of resid is the residual after layer i; heads cells patch one head at all positions."""
    result = run(tiny_view, job_ctx, **PATCH, sites=["resid", "heads"])
    a, b = result["answer"]["id"], result["corrupt_answer"]["id"]
    keys = [("resid", 0), ("heads", 1)]
    with torch.no_grad(), capture(tiny_view, keys) as clean:
        tiny_view.logits(tiny_view.encode(CLEAN))

    def normalized(edits):
        with torch.no_grad(), intervene(tiny_view, edits):
            last = tiny_view.logits(tiny_view.encode(CORRUPT))[0, -1]
        diff = float(last[a] - last[b])
        return (diff - result["corrupt_metric"]) / (result["clean_metric"] - result["corrupt_metric"])
    resid_cell = normalized({("resid", 0): put(clean[("resid", 0)], (3,))})
    head_cell = normalized({("heads", 1): put(clean[("heads", 1)], (slice(None), 2))})
    assert result["grids"]["resid"]["values"][1][3] == pytest.approx(resid_cell, abs=1e-4)
    assert result["grids"]["heads"]["values"][1][2] == pytest.approx(head_cell, abs=1e-4)
    assert abs(resid_cell) > 1e-3 and abs(head_cell) > 1e-3


def test_batch_size_keeps_exact_invariants(tiny_view, job_ctx):
    results = [run(tiny_view, job_ctx, **PATCH, sites=["resid"], batch_size=size) for size in (1, 7)]
    for result in results:
        assert result["grids"]["resid"]["all_positions"] == [1.0] * (tiny_view.n_layers + 1)
    flat = [torch.tensor(r["grids"]["resid"]["values"]) for r in results]
    assert torch.allclose(flat[0], flat[1], atol=1e-4)


@pytest.mark.slow
def test_patching_default_model_subject_lights_up(default_view, job_ctx):
    n = default_view.n_layers
    result = run(default_view, job_ctx, clean=CLEAN, corrupt=CORRUPT, sites=["resid"], layers=[0, 2, 4, n - 1])
    assert (result["answer"]["token"], result["corrupt_answer"]["token"]) == (" Paris", " Rome")
    assert result["clean_metric"] > 0 > result["corrupt_metric"]
    values = result["grids"]["resid"]["values"]
    assert len(values) == 5 and all(len(row) == 9 for row in values)
    assert result["grids"]["resid"]["all_positions"] == [1.0] * 5
    assert values[-1][-1] == 1.0 and values[-1][:-1] == [0.0] * 8  # other positions feed nothing after it
    early = values[:4]  # embed, layers 0, 2, 4: the subject's tokens carry the answer
    assert all(max(row[1:4]) > 0.7 for row in early)  # measured 0.79-0.92 (" Tower"/"iffel")
    assert all(abs(v) < 0.2 for row in early for v in [row[0], *row[4:]])  # measured |v| <= 0.04


# --- causal tracing -----------------------------------------------------------------------------
def test_tracing_without_noise_changes_nothing(tiny_view, job_ctx):
    result = run(tiny_view, job_ctx, clean=CLEAN, noise={"subject": "Eiffel Tower", "std": 0, "samples": 2})
    assert result["p_corrupted"] == result["p_clean"] and result["total_effect"] == 0.0
    for site in ("resid", "mlp", "attn"):
        assert {v for row in result["grids"][site]["values"] for v in row} == {0.0}, site


def test_tracing_with_noise_exact_invariants(tiny_view, job_ctx):
    result = run(tiny_view, job_ctx, **NOISE)
    assert result["subject"] == {"text": "Eiffel Tower", "start": 1, "end": 4}
    assert result["std"] == pytest.approx(3 * float(tiny_view.embed.weight.detach().std()))
    assert result["p_corrupted"] != result["p_clean"]
    resid = result["grids"]["resid"]
    # the clean residual after the last layer, last position, is the clean output; other positions feed nothing
    assert resid["raw"][-1][-1] == result["p_clean"] and resid["values"][-1][-1] == result["total_effect"]
    assert resid["values"][-1][:-1] == [0.0] * 8
    # position 0 comes before the subject: the noise cannot reach it, so restoring it is a no-op
    for site in ("resid", "mlp", "attn"):
        assert all(row[0] == 0.0 for row in result["grids"][site]["values"]), site
    again = run(tiny_view, job_ctx, **NOISE)
    other_seed = run(tiny_view, job_ctx, **NOISE, seed=1)
    assert again["grids"] == result["grids"] and other_seed["p_corrupted"] != result["p_corrupted"]


def test_tracing_window_cell_matches_a_manual_restore(tiny_view, job_ctx):
    """ROME's window: layer L restores L - w//2 .. L + ceil(w/2) - 1; the noise is the documented seeded draw."""
    assert (window_layers(30, 0, 10), window_layers(30, 15, 10), window_layers(30, 29, 10)) == (
        range(5), range(10, 20), range(24, 30))
    result = run(tiny_view, job_ctx, **NOISE, sites=["mlp"], window=2)  # layer 1 restores mlp 0 and 1
    ids, samples, pos = tiny_view.encode(CLEAN), 3, 8  # the last position: mlp 1 there reaches the output
    keys = [("mlp", 0), ("mlp", 1)]
    with torch.no_grad(), capture(tiny_view, keys) as clean:
        tiny_view.logits(ids)
    noise = torch.randn(samples, 3, tiny_view.d_model, generator=torch.Generator().manual_seed(0)) * result["std"]
    probs = []
    for k in range(samples):
        edits = {("embed", 0): add(noise[k], (slice(1, 4),)), **{key: put(clean[key], (pos,)) for key in keys}}
        with torch.no_grad(), intervene(tiny_view, edits):
            probs.append(float(torch.softmax(tiny_view.logits(ids)[0, -1], -1)[result["target"]["id"]]))
    assert result["grids"]["mlp"]["raw"][1][pos] == pytest.approx(sum(probs) / samples, rel=1e-4)


def test_bos_shifts_every_position(tiny_view, job_ctx):
    traced = run(tiny_view, job_ctx, **NOISE, bos=True, sites=["resid"])
    assert traced["tokens"][0] == tiny_view.token_strs([tiny_view.bos_id])[0] and len(traced["tokens"]) == 10
    assert (traced["subject"]["start"], traced["subject"]["end"]) == (2, 5)
    patched = run(tiny_view, job_ctx, **PATCH, bos=True, sites=["resid"])
    assert patched["grids"]["resid"]["values"][0][:2] == [0.0, 0.0]  # BOS and "The" are shared


@pytest.mark.slow
def test_tracing_default_model_noise_hurts_the_answer(default_view, job_ctx):
    n = default_view.n_layers
    result = run(default_view, job_ctx, clean=CLEAN, noise={"subject": "Eiffel Tower", "samples": 3},
                 sites=["resid"], layers=[n - 1])
    assert result["target"]["token"] == " Paris"
    assert result["p_corrupted"] < 0.5 * result["p_clean"]  # measured 0.66 -> 0.03..0.05 (seeds 0-2)
    assert result["grids"]["resid"]["raw"][0][-1] == result["p_clean"]
    assert result["grids"]["resid"]["values"][0][:-1] == [0.0] * 8


# --- ablation -----------------------------------------------------------------------------------
def test_zero_ablating_a_head_is_zeroing_its_o_proj_columns(tiny_view, job_ctx):
    ids, layer, head, hd = tiny_view.encode(CLEAN), 1, 2, tiny_view.head_dim
    edited = copy.deepcopy(tiny_view.model)  # the fixture's weights stay as they are
    with torch.no_grad():
        edited.model.layers[layer].self_attn.o_proj.weight[:, head * hd:(head + 1) * hd] = 0
        expected = edited(input_ids=ids, use_cache=False).logits.float()
        with intervene(tiny_view, ablation_edit(("heads", layer), 0.0, head)):
            ablated = tiny_view.logits(ids)
    assert torch.equal(ablated, expected) and not torch.equal(ablated, tiny_view.logits(ids))

    result = run(tiny_view, job_ctx, **ABLATE, ablation=["zero"])
    target = ids[0, 1:]
    loss = float(torch.nn.functional.cross_entropy(expected[0, :-1], target))
    assert result["grids"]["heads_zero"]["loss"][layer][head] == pytest.approx(loss, abs=1e-5)
    assert result["grids"]["heads_zero"]["values"][layer][head] == pytest.approx(loss - result["clean_loss"], abs=1e-5)


def test_mean_ablation_of_a_constant_activation_is_a_no_op(tiny_view, job_ctx):
    """An outer hook makes head 1.2 and MLP 0 output 0.25 everywhere; their means are that constant."""
    def constant_head(z):
        out = z.clone()
        out[:, :, 2] = 0.25
        return out
    outer = {("heads", 1): constant_head, ("mlp", 0): lambda act: torch.full_like(act, 0.25)}
    with intervene(tiny_view, outer):
        result = run(tiny_view, job_ctx, **ABLATE)
    grids = result["grids"]
    assert grids["heads_mean"]["values"][1][2] == 0.0 and grids["heads_mean"]["delta_logit_diff"][1][2] == 0.0
    assert grids["mlp_mean"]["values"][0][0] == 0.0 and grids["mlp_mean"]["delta_logit_diff"][0][0] == 0.0
    assert grids["heads_zero"]["values"][1][2] != 0.0 and grids["mlp_zero"]["values"][0][0] != 0.0
    assert grids["heads_mean"]["values"][1][0] != 0.0  # the other heads are not constant


def test_mean_ablation_cell_matches_a_manual_mean(tiny_view, job_ctx):
    ids = tiny_view.encode(CLEAN)
    with torch.no_grad(), capture(tiny_view, [("mlp", 0)]) as clean:
        tiny_view.logits(ids)
    mean = clean[("mlp", 0)][0].mean(dim=0)  # over the clean prompt's positions
    with torch.no_grad(), intervene(tiny_view, ablation_edit(("mlp", 0), mean)):
        logits = tiny_view.logits(ids)[0]
    loss = float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]))
    result = run(tiny_view, job_ctx, **ABLATE, ablation=["mean"], sites=["mlp"])
    assert result["grids"]["mlp_mean"]["loss"][0][0] == pytest.approx(loss, abs=1e-5)
    assert result["grids"]["mlp_mean"]["values"][0][0] != 0.0


def test_mean_ablation_over_reference_texts(tiny_view, job_ctx):
    own = run(tiny_view, job_ctx, **ABLATE, ablation=["mean"], sites=["mlp"])
    same = run(tiny_view, job_ctx, **ABLATE, ablation=["mean"], sites=["mlp"], reference=[CLEAN])
    other = run(tiny_view, job_ctx, **ABLATE, ablation=["mean"], sites=["mlp"], reference=["A b c d e f.", "x"])
    values = [torch.tensor(r["grids"]["mlp_mean"]["values"]) for r in (own, same, other)]
    assert torch.allclose(values[0], values[1], atol=1e-5) and not torch.allclose(values[0], values[2], atol=1e-4)
    assert other["mean_over"] == "reference"


# --- steering -----------------------------------------------------------------------------------
def test_steering_zero_is_identity_and_large_changes_text(tiny_view, job_ctx):
    zero = run(tiny_view, job_ctx, **STEER, coefficient=0.0)
    assert zero["steered"] == zero["unsteered"]
    assert len(zero["unsteered"]["token_ids"]) == 8 and zero["layer"] == tiny_view.n_layers // 2
    large = run(tiny_view, job_ctx, **STEER, coefficient=50.0, layer=0)
    assert large["unsteered"] == zero["unsteered"] and large["steered"]["text"] != large["unsteered"]["text"]


def test_steering_vector_file(tiny_view, job_ctx):
    from safetensors import safe_open

    result = run(tiny_view, job_ctx, **STEER, layer=0)
    assert result["artifacts"] == [VECTOR_FILE, "steering.json"]
    with safe_open(str(job_ctx.artifact_dir / VECTOR_FILE), "pt") as file:
        vector, meta = file.get_tensor("vector"), file.metadata()
    assert vector.shape == (tiny_view.d_model,) and float(vector.norm()) == result["norm"] > 0
    assert meta == {"layer": "0", "hidden_size": str(tiny_view.d_model), "norm": repr(result["norm"])}
    assert json.loads((job_ctx.artifact_dir / "steering.json").read_text()) == result


@pytest.mark.slow
def test_steering_default_model(default_view, job_ctx):
    body = {"intervention": "steer", "prompt": "My opinion of the movie is that", "max_tokens": 10,
            "positive": ["I love this movie. It is", "What a wonderful day, I feel"],
            "negative": ["I hate this movie. It is", "What a terrible day, I feel"]}
    zero = run(default_view, job_ctx, **body, coefficient=0.0)
    steered = run(default_view, job_ctx, **body)  # default coefficient 2 at layer 15
    assert zero["steered"] == zero["unsteered"] == steered["unsteered"]
    # measured: " it's a movie about a young woman who's" -> " it is a must-see for anyone who loves"
    assert steered["steered"]["text"] != steered["unsteered"]["text"]
    assert 5 < steered["norm"] < 50  # measured 16.7; one-token prompts would read the attention sink (~55)


# --- across the engine --------------------------------------------------------------------------
def test_results_depend_on_prompt_and_model(tiny_view, tiny_view_b, job_ctx):
    base = run(tiny_view, job_ctx, **PATCH)
    other_prompt = run(tiny_view, job_ctx, **{**PATCH, "clean": "The Eiffel Tower is in the town of"})
    other_model = run(tiny_view_b, job_ctx, **PATCH)
    for other in (other_prompt, other_model):
        assert other["clean_metric"] != base["clean_metric"] and other["grids"] != base["grids"]


@pytest.mark.parametrize("body", [PATCH, NOISE, ABLATE, STEER], ids=["patch", "noise", "ablate", "steer"])
def test_artifacts_are_valid_and_nothing_is_left_behind(tiny_view, job_ctx, body):
    before = fingerprint(tiny_view)
    seen = []
    ctx = JobContext(job_ctx.artifact_dir, on_progress=lambda f, _m: seen.append(f))
    result = run(tiny_view, ctx, **body)
    assert fingerprint(tiny_view) == before
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert json.loads(json.dumps(result)) == result  # plain JSON types only
    for name in result["artifacts"]:
        data = (ctx.artifact_dir / name).read_bytes()
        if name.endswith(".png"):
            assert data.startswith(PNG), name
        elif name.endswith(".json"):
            assert json.loads(data) == result
    assert len([n for n in result["artifacts"] if n.endswith(".png")]) == len(result.get("grids", {}))


@pytest.mark.parametrize("body", [PATCH, NOISE, ABLATE, STEER], ids=["patch", "noise", "ablate", "steer"])
def test_cancel_raises_and_removes_hooks(tiny_view, tmp_path, body):
    before = fingerprint(tiny_view)
    ctx = JobContext(tmp_path / "pre")
    ctx.cancel()
    with pytest.raises(JobCancelled):
        run(tiny_view, ctx, **body)
    box: list[JobContext] = []  # cancelled from inside, once the work is under way
    box.append(JobContext(tmp_path / "mid", on_progress=lambda f, _m: f >= 0.05 and box[0].cancel()))
    with pytest.raises(JobCancelled):
        run(tiny_view, box[0], **body, batch_size=4)
    assert fingerprint(tiny_view) == before


@pytest.mark.parametrize("body, message", [
    ({"clean": CLEAN, "corrupt": "The Colosseum is in Rome, the city of"}, "same number of tokens"),
    ({"clean": CLEAN}, "needs `corrupt`"),
    ({**PATCH, "noise": {"subject": "Eiffel"}}, "not both"),
    ({**PATCH, "layers": [99]}, "out of range"),
    ({**PATCH, "answer": " Rome"}, "same token"),
    ({"clean": "", "corrupt": ""}, "`clean` is empty"),
    ({**NOISE, "noise": {"subject": "Louvre"}}, "not a substring"),
    ({**NOISE, "noise": {"subject": "Eiffel", "samples": 0}}, "samples"),
    ({**NOISE, "noise": {"subject": "Eiffel", "std": -1.0}}, "noise.std"),
    ({**NOISE, "sites": ["heads"]}, "per-head"),
    ({**ABLATE, "sites": ["resid"]}, "ablate works on"),
    ({**ABLATE, "clean": "The"}, "at least 2 tokens"),
    ({**STEER, "positive": []}, "`positive` is empty"),
    ({**STEER, "layer": 2}, "out of range"),
    ({**STEER, "max_tokens": 0}, "max_tokens"),
    ({**PATCH, "batch_size": 0}, "batch_size"),
])
def test_bad_spec_raises_value_error(tiny_view, job_ctx, body, message):
    """The engine's own checks, on specs built in Python (the server's decoding rejects some of these first)."""
    fields = {**body, "noise": NoiseSpec(**body["noise"])} if "noise" in body else body
    with pytest.raises(ValueError, match=message):
        run_causal(tiny_view, CausalSpec(**fields), job_ctx)


def test_spec_decodes_like_the_server():
    spec = msgspec.convert({"model": "m", "clean": "a", "corrupt": "b"}, CausalSpec)
    assert spec.intervention == "patch" and spec.ablation == ["zero", "mean"] and spec.noise is None
    assert msgspec.convert({"noise": {"subject": "x"}}, CausalSpec).noise.samples == 10
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"intervention": "erase"}, CausalSpec)
    for body, path in (({"batch_size": 0}, "batch_size"), ({"noise": {"subject": "x", "samples": 257}}, "noise.samples"),
                       ({"max_tokens": 0}, "max_tokens")):  # bounds: the server's 400 names the field
        with pytest.raises(msgspec.ValidationError, match=rf"\$\.{path}"):
            msgspec.convert(body, CausalSpec)
