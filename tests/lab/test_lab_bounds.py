"""Every Lab spec field has a bound: out of bounds is a 400 naming the field, before any job exists, on a live
server (the bounds table in README.md's Lab section)."""
from __future__ import annotations

import httpx
import pytest

pytest.importorskip("torch")

from tests.conftest import LiveServer
from tests.lab.test_lab_api import TINY, _workdir

CLEAN = "The Eiffel Tower is in the city of"
PATCH = {"clean": CLEAN, "corrupt": "The Colosseum is in the city of"}
NOISE = {"clean": CLEAN, "noise": {"subject": "Eiffel Tower"}}


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    live = LiveServer(_workdir(tmp_path_factory.mktemp("lab-bounds")))
    with httpx.Client(base_url=live.base_url, timeout=120) as client:
        yield client
    live.stop()


def jobs(http) -> int:
    return len(http.get("/lab/jobs", params={"limit": 1000}).json()["data"])


ROUTES = {"causal_test": "/lab/causal_test", "trace": "/lab/trace", "diagnostics": "/lab/diagnostics/run",
          "snapshot": "/lab/snapshot", "rollback": "/lab/rollback"}
LONG = "x" * 32_769
OUT_OF_BOUNDS = [  # (kind, body, the param the 400 names)
    ("causal_test", {**PATCH, "batch_size": 0}, "batch_size"),
    ("causal_test", {**PATCH, "batch_size": 257}, "batch_size"),
    ("causal_test", {**NOISE, "noise": {"subject": "Eiffel", "samples": 0}}, "noise.samples"),
    ("causal_test", {**NOISE, "noise": {"subject": "Eiffel", "samples": 257}}, "noise.samples"),
    ("causal_test", {**NOISE, "noise": {"subject": "Eiffel", "std": -1}}, "noise.std"),
    ("causal_test", {**NOISE, "noise": {"subject": "E" * 1001}}, "noise.subject"),
    ("causal_test", {**PATCH, "clean": LONG}, "clean"),
    ("causal_test", {**PATCH, "corrupt": LONG}, "corrupt"),
    ("causal_test", {**PATCH, "layers": [-1]}, "layers[0]"),
    ("causal_test", {**PATCH, "layers": [0, 4096]}, "layers[1]"),
    ("causal_test", {**PATCH, "sites": ["resid"] * 5}, "sites"),
    ("causal_test", {**NOISE, "window": 0}, "window"),
    ("causal_test", {**PATCH, "answer": "a" * 1001}, "answer"),
    ("causal_test", {**PATCH, "seed": -1}, "seed"),
    ("causal_test", {"clean": CLEAN, "intervention": "ablate", "reference": ["a"] * 65}, "reference"),
    ("causal_test", {"clean": CLEAN, "intervention": "ablate", "ablation": ["zero", "mean", "zero"]}, "ablation"),
    ("causal_test", {"intervention": "steer", "positive": ["a"] * 65, "negative": ["b"]}, "positive"),
    ("causal_test", {"intervention": "steer", "positive": ["a"], "negative": ["b"], "max_tokens": 513}, "max_tokens"),
    ("causal_test", {"intervention": "steer", "positive": ["a"], "negative": ["b"], "coefficient": 1e5},
     "coefficient"),
    ("causal_test", {"intervention": "steer", "positive": ["a"], "negative": ["b"], "layer": 4096}, "layer"),
    ("trace", {"prompt": LONG}, "prompt"),
    ("trace", {"prompt": CLEAN, "n_steps": 0}, "n_steps"),
    ("trace", {"prompt": CLEAN, "n_steps": 4097}, "n_steps"),
    ("trace", {"prompt": CLEAN, "batch_size": 257}, "batch_size"),
    ("trace", {"prompt": CLEAN, "max_target_tokens": 65}, "max_target_tokens"),
    ("trace", {"prompt": CLEAN, "tolerance": 1.0}, "tolerance"),
    ("trace", {"prompt": CLEAN, "baseline": "token", "baseline_token_id": -1}, "baseline_token_id"),
    ("trace", {"prompt": CLEAN, "target": "t" * 1001}, "target"),
    ("diagnostics", {"n_sequences": 257}, "n_sequences"),
    ("diagnostics", {"repeat_len": 1}, "repeat_len"),
    ("diagnostics", {"repeat_len": 4097}, "repeat_len"),
    ("diagnostics", {"n_controls": 10001}, "n_controls"),
    ("diagnostics", {"role_threshold": 1.5}, "role_threshold"),
    ("diagnostics", {"outlier_z": 0}, "outlier_z"),
    ("diagnostics", {"min_k_percent": 0}, "min_k_percent"),
    ("diagnostics", {"near_zero_eps": 2}, "near_zero_eps"),
    ("diagnostics", {"probe_sets": ["../../etc/passwd"]}, "probe_sets[0]"),
    ("diagnostics", {"probes": [{"prompt": "a", "correct": " b", "incorrect": []}]}, "probes[0].incorrect"),
    ("diagnostics", {"texts": ["a"] * 65}, "texts"),
    ("diagnostics", {"canaries": ["c" * 1001]}, "canaries[0]"),
    ("diagnostics", {"sections": ["heads"] * 5}, "sections"),
    ("snapshot", {"note": "n" * 1001}, "note"),
    ("rollback", {"snapshot": "s" * 101}, "snapshot"),
]


def test_each_bound_is_a_400_naming_the_field_and_no_job(http):
    before = jobs(http)
    for kind, body, param in OUT_OF_BOUNDS:
        response = http.post(ROUTES[kind], json={"model": TINY, **body})
        assert response.status_code == 400, (kind, param, response.text)
        assert response.json()["error"]["param"] == param, (kind, param, response.json())
    assert jobs(http) == before
