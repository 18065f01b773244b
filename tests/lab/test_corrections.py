"""The correction queue through a live server: store, list, delete, a recent chat completion named
by id (streamed or not), the errors (each a 400 naming the field), and durability across a restart."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import LiveServer

HI = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("corrections")


@pytest.fixture(scope="module")
def live(work):
    server = LiveServer(work)
    yield server
    server.stop()


def test_a_correction_is_stored_listed_and_deleted(live):
    with httpx.Client(base_url=live.base_url, timeout=120) as http:
        made = http.post("/lab/queue", json={"model": "default", "prompt": "The capital of France is",
                                             "good": " Paris", "bad": " Lyon"})
        assert made.status_code == 200, made.text
        row = made.json()
        assert row["object"] == "lab.correction" and row["id"].startswith("corr_") and row["status"] == "queued"
        assert (row["model"], row["prompt"], row["good"], row["bad"], row["messages"]) == (
            "smollm2-135m-instruct", "The capital of France is", " Paris", " Lyon", None)
        listed = http.get("/lab/queue", params={"model": "smollm2"}).json()["data"]
        assert row["id"] in [c["id"] for c in listed]
        assert http.delete(f"/lab/queue/{row['id']}").json() == {"id": row["id"], "deleted": True,
                                                                   "object": "lab.correction.deleted"}
        assert row["id"] not in [c["id"] for c in http.get("/lab/queue").json()["data"]]
        gone = http.delete(f"/lab/queue/{row['id']}")
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "id"


@pytest.mark.parametrize("stream", [False, True])
def test_a_recent_completion_becomes_the_corrections_conversation_and_bad_answer(live, stream):
    client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="none", max_retries=0)
    kwargs = dict(model="default", messages=HI, max_tokens=12, temperature=0)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        completion_id, answer = chunks[0].id, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        done = client.chat.completions.create(**kwargs)
        completion_id, answer = done.id, done.choices[0].message.content
    with httpx.Client(base_url=live.base_url, timeout=120) as http:
        made = http.post("/lab/queue", json={"model": "default", "completion_id": completion_id, "good": "Paris."})
        assert made.status_code == 200, made.text
        row = made.json()
    assert row["messages"] == HI and row["bad"] == answer and answer and row["completion_id"] == completion_id


@pytest.mark.parametrize("body, param", [
    ({"model": "default", "prompt": "Hi", "good": "   "}, "good"),
    ({"model": "default", "prompt": "Hi"}, "good"),
    ({"model": "default", "good": "x"}, "prompt"),
    ({"model": "default", "prompt": "Hi", "messages": HI, "good": "x"}, "prompt"),
    ({"model": "default", "completion_id": "chatcmpl-nope", "good": "x"}, "completion_id"),
    ({"model": "default", "messages": [{"role": "wizard", "content": "x"}], "good": "x"}, "messages[0]"),
    ({"model": "victor", "prompt": "Hi", "good": "x"}, "model"),  # a custom runner: no torch weights
])
def test_bad_corrections_are_400s_naming_the_field_and_store_nothing(live, body, param):
    with httpx.Client(base_url=live.base_url, timeout=120) as http:
        before = http.get("/lab/queue").json()["data"]
        r = http.post("/lab/queue", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert http.get("/lab/queue").json()["data"] == before
    unknown = httpx.post(live.base_url + "/lab/queue", json={"model": "nope", "prompt": "x", "good": "y"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_corrections_survive_a_restart(work, live):
    with httpx.Client(base_url=live.base_url, timeout=120) as http:
        kept = http.post("/lab/queue", json={"model": "default", "messages": HI, "good": "Paris."}).json()
    live.stop()
    again = LiveServer(work)
    try:
        listed = httpx.get(again.base_url + "/lab/queue", params={"model": "default"}, timeout=60).json()["data"]
        assert kept in listed
    finally:
        again.stop()
