"""The Lab's torch copies share the router's memory budget (--max-memory) with served models, on the
default model through a live server: a copy evicts the idle served model, a chat request takes the
room back from an idle copy, and while a job holds its copy a load that cannot fit is a clear 507."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

pytest.importorskip("torch")

from tests.conftest import LiveServer
from tests.lab.test_lab_api import submit, wait

MiB = 1 << 20
BUDGET = 900 * MiB  # the served GGUF (~311 MiB estimated) or the Lab's fp32 copy (~757 MiB), not both
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("lab-memory"), "--max-memory", str(BUDGET))
    yield server
    server.stop()


def state(http) -> tuple[list[str], list[dict], int]:
    """(served models, Lab copies, bytes used of the budget)"""
    ps, lab = http.get("/api/ps").json(), http.get("/lab/models").json()
    assert ps["memory_used_bytes"] == lab["memory_used_bytes"] and lab["memory_budget_bytes"] == BUDGET
    return [m["id"] for m in ps["models"]], lab["data"], lab["memory_used_bytes"]


@pytest.mark.slow
def test_lab_copies_and_served_models_share_the_budget(live):
    client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="none", max_retries=0)
    with httpx.Client(base_url=live.base_url, timeout=120) as http:
        assert client.chat.completions.create(model="default", messages=HI, max_tokens=4).choices[0].message.content
        served, copies, _ = state(http)
        assert served == ["smollm2-135m-instruct"] and copies == []

        job = wait(http, submit(http, "/lab/trace", model="default", prompt="Hello there",
                                method="attention_rollout")["id"])
        assert job["status"] == "succeeded", job
        served, copies, used = state(http)
        assert served == []  # evicted (idle) to make room for the copy
        assert [(c["model"], c["state"]) for c in copies] == [("smollm2-135m-instruct", "idle")]
        assert 600 * MiB < copies[0]["memory_bytes"] == used <= BUDGET

        # chat takes the room back from the idle copy
        assert client.chat.completions.create(model="default", messages=HI, max_tokens=4).choices[0].message.content
        served, copies, used = state(http)
        assert served == ["smollm2-135m-instruct"] and copies == [] and used <= BUDGET

        # a running job's copy cannot be taken: the chat load that does not fit is a 507, and nothing breaks.
        # A long job whose working set (~100 MiB estimated) fits beside the copy in the budget: at batch_size 32
        # or on a longer prompt, the submit-time check refuses it (the copy leaves ~140 MiB of the 900).
        job = submit(http, "/lab/trace", model="default", method="integrated_gradients", n_steps=4096, batch_size=2,
                     tolerance=0.0, prompt="The quick brown fox")
        wait(http, job["id"], statuses=("running",))
        deadline = time.monotonic() + 60
        while state(http)[0] and time.monotonic() < deadline:  # until the job's copy has evicted the model
            time.sleep(0.1)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="default", messages=HI, max_tokens=4)
        assert refused.value.status_code == 507
        error = refused.value.response.json()["error"]
        assert error["code"] == "insufficient_memory" and "Lab jobs hold" in error["message"]
        assert http.delete(f"/lab/jobs/{job['id']}").status_code == 200
        assert wait(http, job["id"])["status"] == "cancelled"
        assert client.chat.completions.create(model="default", messages=HI, max_tokens=4).choices[0].message.content
        served, copies, used = state(http)
        assert served == ["smollm2-135m-instruct"] and copies == [] and used <= BUDGET
