"""Auras served on a live server (the default model on llama_cpp, the real openai SDK on loopback):
`model: "base+aura"` changes the output, the base is byte-identical afterwards, concurrent requests
with different auras do not leak into each other, token_bias and prompt_delta act, and every way an
aura can be wrong is a clear error while the base keeps serving. Auras are written with
AuraStore.write, the API the Lab uses for a finished job."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from safetensors.numpy import save_file

from server.lab.auras import AuraStore
from server.registry import Registry
from tests.conftest import DEFAULT_GGUF_SOURCE, LiveServer

DEFAULT = "smollm2-135m-instruct"
PARALLEL = "smollm2-par"  # the same GGUF with two workers (two llama.cpp contexts)
HIDDEN, FF, LAYERS = 576, 1536, 30
MESSAGES = [{"role": "user", "content": "Name three things people often keep in a kitchen drawer."}]


def _lora_file(folder: Path, name: str, seed: int, layers: list[int], std: float) -> dict:
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers:
        tensors[f"layers.{layer}.mlp.down_proj.lora_A"] = (rng.standard_normal((4, FF)) * std).astype(np.float32)
        tensors[f"layers.{layer}.mlp.down_proj.lora_B"] = (rng.standard_normal((HIDDEN, 4)) * std).astype(np.float32)
    save_file(tensors, str(folder / name), metadata={"rank": "4", "alpha": "4"})
    return {"kind": "lora", "file": name, "rank": 4, "alpha": 4.0, "modules": ["mlp.down_proj"], "layers": layers}


def _steering_file(folder: Path, name: str, seed: int, layer: int, coefficient: float) -> dict:
    vector = np.random.default_rng(seed).standard_normal(HIDDEN).astype(np.float32)
    save_file({"vector": vector / np.linalg.norm(vector)}, str(folder / name))
    return {"kind": "steering", "file": name, "layer": layer, "coefficient": coefficient}


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    work = tmp_path_factory.mktemp("auras")
    (work / "models" / PARALLEL).mkdir(parents=True)
    (work / "models" / PARALLEL / "manifest.yaml").write_text(
        f"id: {PARALLEL}\nbackend: llama_cpp\nsource: {DEFAULT_GGUF_SOURCE}\nparallel: 2\ncontext_length: 2048\n")
    registry = Registry(work / "models", lab_dir=work / "lab")
    registry.scan()
    job = work / "job"
    job.mkdir()
    store = AuraStore(work / "lab" / "auras")
    lora_a = _lora_file(job, "a.safetensors", 1, [8, 9, 10, 11], 0.08)
    lora_b = _lora_file(job, "b.safetensors", 2, [14, 15], 0.08)
    steer_b = _steering_file(job, "s.safetensors", 3, 12, 6.0)
    for base, prefix in ((registry.get(DEFAULT), ""), (registry.get(PARALLEL), "par-")):
        store.write(f"{prefix}a", base, [lora_a], job, {"job": "job_a", "method": "lora"})
        store.write(f"{prefix}b", base, [lora_b, steer_b], job, {"job": "job_b", "method": "steer"})
    store.write("pd", registry.get(DEFAULT), [{"kind": "prompt_delta", "text": "Always answer in French."}], job, {})
    store.write("tampered", registry.get(DEFAULT), [lora_a], job, {})
    server = LiveServer(work, "--aura-cache", "4")
    yield server, store, registry
    server.stop()


@pytest.fixture(scope="module")
def sdk(live):
    with openai.OpenAI(base_url=live[0].base_url + "/v1", api_key="none", max_retries=0) as client:
        yield client


def chat(sdk, model: str, messages=MESSAGES, max_tokens: int = 20):
    return sdk.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                       seed=7)


def text(sdk, model: str, **kw) -> str:
    return chat(sdk, model, **kw).choices[0].message.content


def test_v1_models_lists_each_aura_on_its_base(sdk):
    ids = {m.id for m in sdk.models.list().data}
    assert {f"{DEFAULT}+a", f"{DEFAULT}+b", f"{DEFAULT}+pd", f"{PARALLEL}+par-a", f"{PARALLEL}+par-b"} <= ids
    assert DEFAULT in ids and PARALLEL in ids


def test_an_aura_changes_the_output_and_the_base_is_byte_identical_after(sdk):
    before = chat(sdk, "default")
    with_a = chat(sdk, "default+a")
    with_b = chat(sdk, "default+b")
    after = chat(sdk, "default")
    assert with_a.model == f"{DEFAULT}+a" and after.model == DEFAULT
    assert with_a.choices[0].message.content != before.choices[0].message.content
    assert with_b.choices[0].message.content not in (before.choices[0].message.content,
                                                      with_a.choices[0].message.content)
    assert after.choices[0].message.content == before.choices[0].message.content
    assert text(sdk, "default+a") == with_a.choices[0].message.content  # and an aura is reproducible
    completion = sdk.completions.create(model="default+a", prompt="The kitchen drawer holds", max_tokens=12,
                                        temperature=0)
    base = sdk.completions.create(model="default", prompt="The kitchen drawer holds", max_tokens=12, temperature=0)
    assert completion.choices[0].text != base.choices[0].text  # LoRA acts on every generating endpoint


@pytest.mark.parametrize("base, a, b", [("default", "default+a", "default+b"),
                                        (PARALLEL, f"{PARALLEL}+par-a", f"{PARALLEL}+par-b")])
def test_concurrent_requests_with_different_auras_get_what_they_get_alone(sdk, base, a, b):
    alone = {m: text(sdk, m) for m in (a, b, base)}
    assert len(set(alone.values())) == 3
    barrier = threading.Barrier(3)

    def run(model):
        barrier.wait()
        return model, text(sdk, model)

    for _round in range(2):
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(run, [a, b, base]))
        assert dict(results) == alone


def test_token_bias_and_prompt_delta_act(live, sdk):
    server, store, registry = live
    piece = httpx.post(f"{server.base_url}/api/models/{DEFAULT}/tokenize",
                       json={"text": " banana", "with_pieces": True}).json()
    token = piece["tokens"][0]
    store.compose("bias", [], [{"kind": "token_bias", "bias": {str(token): 100.0}}], registry.get(DEFAULT))
    banana = text(sdk, "default+bias", max_tokens=4)
    single = httpx.post(f"{server.base_url}/api/models/{DEFAULT}/detokenize", json={"tokens": [token]}).json()["text"]
    assert banana == single * 4
    system = [{"role": "system", "content": "You are a helpful assistant."}, *MESSAGES]
    plain, told = chat(sdk, "default", messages=system), chat(sdk, "default+pd", messages=system)
    assert told.usage.prompt_tokens > plain.usage.prompt_tokens + 4  # the system prompt grew by the delta
    assert told.choices[0].message.content != plain.choices[0].message.content
    stacked = chat(sdk, "default+pd+a", messages=system)
    assert stacked.model == f"{DEFAULT}+pd+a" and stacked.usage.prompt_tokens == told.usage.prompt_tokens
    prompt = "The kitchen drawer holds"  # a completion gets the delta as a line before its prompt
    kw = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    delta = store.get("pd").components[0].text
    with_delta = sdk.completions.create(model="default+pd", **kw)
    by_hand = sdk.completions.create(model="default", **{**kw, "prompt": f"{delta}\n{prompt}"})
    assert with_delta.choices[0].text == by_hand.choices[0].text
    assert with_delta.usage.prompt_tokens == by_hand.usage.prompt_tokens


def test_a_wrong_aura_is_a_clear_error_and_the_base_keeps_serving(live, sdk):
    _server, store, _registry = live
    base = text(sdk, "default")
    with pytest.raises(openai.NotFoundError) as missing:
        chat(sdk, "default+nope")
    assert missing.value.body["code"] == "model_not_found" and "`nope`" in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as other:
        chat(sdk, "default+par-a")
    assert other.value.body["code"] == "aura_base_mismatch" and PARALLEL in other.value.body["message"]
    assert text(sdk, "default+tampered") == text(sdk, "default+a")
    path = store.root / "tampered" / "c1.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(openai.APIStatusError) as tampered:
        chat(sdk, "default+tampered")
    assert tampered.value.status_code == 409 and tampered.value.body["code"] == "aura_hash_mismatch"
    assert "c1" in tampered.value.body["message"]
    assert text(sdk, "default") == base


def test_lab_aura_routes(live, sdk):
    server, _store, _registry = live
    url = server.base_url + "/lab/auras"
    listed = httpx.get(url).json()
    assert {"a", "b", "pd"} <= {a["name"] for a in listed["data"]} and listed["object"] == "list"
    one = httpx.get(f"{url}/b").json()
    assert one["model"] == f"{DEFAULT}+b" and [c["kind"] for c in one["components"]] == ["lora", "steering"]
    assert httpx.get(f"{url}/zzz").status_code == 404
    made = httpx.post(url, json={"name": "combo", "auras": ["a"], "components": [
        {"aura": "b", "id": "c2", "weight": 0.5}, {"kind": "prompt_delta", "text": "Be brief."}]})
    assert made.status_code == 201, made.text
    assert [(c["kind"], c["weight"]) for c in made.json()["components"]] == \
        [("lora", 1.0), ("steering", 0.5), ("prompt_delta", 1.0)]
    assert chat(sdk, "default+combo").model == f"{DEFAULT}+combo"
    again = httpx.post(url, json={"name": "combo", "auras": ["a"]})
    assert again.status_code == 409 and again.json()["error"]["code"] == "aura_exists"
    bad = httpx.post(url, json={"name": "Bad Name", "auras": ["a"]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"
    mixed = httpx.post(url, json={"name": "mixed", "auras": ["a", "par-a"]})
    assert mixed.status_code == 400 and mixed.json()["error"]["code"] == "aura_base_mismatch"
    assert httpx.delete(f"{url}/combo").json() == {"name": "combo", "deleted": True, "object": "lab.aura.deleted"}
    assert httpx.get(f"{url}/combo").status_code == 404 and httpx.delete(f"{url}/combo").status_code == 404
    with pytest.raises(openai.NotFoundError):
        chat(sdk, "default+combo")
