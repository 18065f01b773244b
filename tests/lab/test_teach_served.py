"""The whole loop on a live server: a correction becomes an aura that the served model — the
default model on llama.cpp — answers with, while the base keeps its own answers byte for byte."""
from __future__ import annotations

import time

import httpx
import pytest

pytest.importorskip("torch")

from tests.conftest import LiveServer

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("teach-served"))
    with httpx.Client(base_url=live.base_url, timeout=600) as client:
        yield client
    live.stop()


def _answer(http, model: str, prompt: str = PROMPT) -> str:
    r = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _job(http, route: str, body: dict) -> dict:
    submitted = http.post(route, json=body)
    assert submitted.status_code == 202, submitted.text
    deadline = time.monotonic() + 600
    while (job := http.get(f"/lab/jobs/{submitted.json()['id']}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    return job


@pytest.mark.slow
def test_a_rome_edit_is_served_on_llama_cpp_and_the_base_is_untouched(http):
    base = _answer(http, "default")
    assert not base.startswith(" Rome")
    job = _job(http, "/lab/train/target", {"model": "default", "prompt": PROMPT, "target": " Rome",
                                           "method": "rome", "aura": "paris-rome"})
    result = job["result"]
    assert not result["reverted"] and result["restored_identical"] and result["serve_as"] == \
        "smollm2-135m-instruct+paris-rome"
    (component,) = http.get("/lab/auras/paris-rome").json()["components"]
    assert component["kind"] == "lora" and component["rank"] == 1 and component["modules"] == ["mlp.down_proj"]
    assert _answer(http, "default+paris-rome").startswith(" Rome")
    assert _answer(http, "default") == base  # the base model, byte for byte
    models = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert "smollm2-135m-instruct+paris-rome" in models


@pytest.mark.slow
def test_queued_corrections_train_live_into_an_aura_that_serves_them(http):
    made = http.post("/lab/queue", json={"model": "default", "prompt": PROMPT, "good": " Rome"})
    assert made.status_code == 200, made.text
    job = _job(http, "/lab/train/live", {"model": "default", "method": "token_bias", "aura": "live-bias",
                                         "regression_set": "none"})
    result = job["result"]
    assert result["method"] == "token_bias" and not result["reverted"] and result["aura"] == "live-bias"
    assert [(c["prompt"], c["good"]) for c in job["spec"]["corrections"]] == [(PROMPT, " Rome")]
    corrections = http.get("/lab/queue", params={"model": "default"}).json()["data"]
    assert [(c["id"], c["status"], c["applied_by"]) for c in corrections] == [(made.json()["id"], "applied", job["id"])]
    assert _answer(http, "default+live-bias").startswith(" Rome")
    empty = http.post("/lab/train/live", json={"model": "default", "method": "token_bias"})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "model"  # nothing queued any more


@pytest.mark.slow
def test_a_lora_on_a_new_fact_raises_it_and_the_served_model_answers_it(http):
    prompt, target = "Professor Quillby's pet dragon is named", " Ember"
    assert not _answer(http, "default", prompt).startswith(target)
    job = _job(http, "/lab/train/target", {"model": "default", "prompt": prompt, "target": target,
                                           "method": "lora", "aura": "dragon"})
    result = job["result"]
    assert result["method"] == "lora" and not result["reverted"], result.get("revert_reason")
    (case,) = result["report"]["efficacy"]["cases"]
    assert case["target_logprob"]["after"] - case["target_logprob"]["before"] > 1.0  # mean over its tokens, nats
    assert _answer(http, "default+dragon", prompt).startswith(target)
