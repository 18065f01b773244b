"""The onnx_runtime backend and `omniloader models export-onnx`, end to end on a tiny random llama:
export it with the CLI while a server runs, check the ONNX graph against torch (logits and greedy
decoding), then serve it through the openai SDK."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import msgspec.yaml
import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from adapters import create_adapter
from adapters.base import GenerateParams
from adapters.onnx_runtime import Sampler
from server.registry import Registry
from tests.conftest import DEFAULT_GGUF_SOURCE, REPO, LiveServer

pytestmark = pytest.mark.slow

MODEL = "tiny-llama-onnx"
LOGITS_TOLERANCE = 1e-4  # fp32 graph vs fp32 torch: max |logit diff| over every position and vocab entry
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """models/tiny-llama: a random-init LlamaForCausalLM with SmolLM2's tokenizer (from the default GGUF)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from server.registry import resolve_source

    work = tmp_path_factory.mktemp("onnx")
    gguf = resolve_source(DEFAULT_GGUF_SOURCE, REPO)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    hf_dir = work / "models" / "tiny-llama"
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    return work


@pytest.fixture(scope="module")
def server(work):
    """Serves work/models; it starts before the export, which it finds on rescan."""
    live = LiveServer(work)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def export(work, server):
    """Runs the CLI as a user would, while the server runs; returns its output."""
    listed = {m["id"] for m in httpx.get(server.base_url + "/api/models").json()["data"]}
    assert "tiny-llama" in listed and MODEL not in listed
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "server", "models", "export-onnx", "tiny-llama",
                          "--models-dir", str(work / "models"), "--lab-dir", str(work / "lab")],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    print(f"export-onnx of the tiny llama: {time.perf_counter() - started:.1f}s")
    return run.stdout


@pytest.fixture(scope="module")
def torch_model(work):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(work / "models" / "tiny-llama").eval()
    model.generation_config.eos_token_id = None  # 32 tokens whatever comes: compare whole continuations
    return model


@pytest.fixture(scope="module")
def adapter(work, export):
    registry = Registry(work / "models")
    registry.scan()
    adapter = create_adapter(registry.get(MODEL))
    adapter.prefill_chunk = 7  # several prefill passes on the cache, as long prompts run
    adapter.load()
    yield adapter
    adapter.unload()


def test_export_writes_a_servable_folder(work, export):
    out = work / "models" / MODEL
    assert "check: onnxruntime vs torch logits" in export and "done:" in export
    assert {"model.onnx", "tokenizer.json", "config.json", "manifest.yaml"} <= {p.name for p in out.iterdir()}
    manifest = msgspec.yaml.decode((out / "manifest.yaml").read_bytes())
    assert manifest["id"] == MODEL and manifest["backend"] == "onnx_runtime"
    assert manifest["context_length"] == 256
    assert set(manifest["capabilities"]) == {"chat", "completion", "logprobs"}
    assert not list((work / "models").glob(".*partial"))  # no half-written folder is left behind

    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert [o.name for o in session.get_outputs()] == ["logits"] + [f"present.{i}.{k}" for i in range(2)
                                                                   for k in ("key", "value")]


def test_onnx_logits_match_torch(adapter, torch_model):
    """The same weights give the same logits (within LOGITS_TOLERANCE), prompt passes chained through
    the KV cache included."""
    ids = np.random.default_rng(0).integers(0, adapter._n_vocab, 40).tolist()
    onnx_logits, _ = adapter.prefill(ids, keep_all=True)  # 6 passes of 7 tokens, each on the cache before it
    with torch.no_grad():
        reference = torch_model(torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(onnx_logits - reference).max())
    print(f"max |onnx - torch| logit diff over {len(ids)} positions: {diff:.2e}")
    assert onnx_logits.shape == reference.shape
    assert diff < LOGITS_TOLERANCE


def test_greedy_continuation_matches_transformers_generate(adapter, torch_model):
    prompt = adapter.prompt_tokens(GenerateParams(messages=[{"role": "user", "content": "Tell me a story."}]))
    greedy = Sampler(GenerateParams(temperature=0.0), adapter._n_vocab, [], prompt)
    onnx_ids = [token for token, _ in adapter.decode(prompt, 32, greedy)]
    with torch.no_grad():
        out = torch_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   do_sample=False, max_new_tokens=32, min_new_tokens=32, pad_token_id=0)
    assert onnx_ids == out[0, len(prompt):].tolist()


def test_sampling_seeds_stops_and_usage(adapter):
    cancel = threading.Event()

    def run(**kw):
        deltas = list(adapter.generate(GenerateParams(prompt="Once upon a time", **kw), cancel))
        return "".join(d.text for d in deltas), deltas[-1]

    sampled = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "min_p": 0.02, "max_tokens": 12}
    first, last = run(seed=7, **sampled)
    assert run(seed=7, **sampled)[0] == first
    assert run(seed=8, **sampled)[0] != first
    assert last.finish_reason == "length" and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == len(adapter.tokenize("Once upon a time"))
    stop = first.strip()[:3]
    text, last = run(seed=7, stop=[stop], **sampled)
    assert stop not in text and last.finish_reason == "stop"
    text, _ = run(temperature=0.0, max_tokens=5, logit_bias={42: 100.0})  # token 42 is ":"
    assert text == ":" * 5

    with pytest.raises(Exception, match="maximum context length is 256"):
        run(max_tokens=300)
    cancel.set()
    assert run(max_tokens=10)[1].usage.completion_tokens == 0  # cancelled before the first token


def test_chat_stream_and_not_through_the_sdk(server, export):
    from openai import OpenAI

    rescan = httpx.post(server.base_url + "/api/models/rescan").json()["data"]
    entry = next(m for m in rescan if m["id"] == MODEL)  # exported while the server ran: picked up on rescan
    assert entry["backend"] == "onnx_runtime" and entry["origin"] == "curated"
    with OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0,
                _strict_response_validation=True) as client:
        full = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0,
                                              logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
        choice = full.choices[0]
        assert choice.finish_reason == "length" and full.usage.completion_tokens == 16
        assert len(choice.logprobs.content) == 16 and len(choice.logprobs.content[0].top_logprobs) == 2
        chunks = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16, temperature=0,
                                                     stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == choice.message.content
        assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
        assert full.usage.prompt_tokens == 31  # SmolLM2's template with its default system prompt, + "Hi"

        from openai import BadRequestError

        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=HI, tools=[tool], tool_choice="required")
        assert refused.value.status_code == 400 and MODEL in refused.value.message
        assert refused.value.body["param"] == "tools"


def _rss(server) -> int:
    import os

    with open(f"/proc/{server.process.pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _wait_state(server, state: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        models = {m["id"]: m for m in httpx.get(server.base_url + "/api/models").json()["data"]}
        if models[MODEL]["state"] == state:
            return
        time.sleep(0.1)
    raise AssertionError(f"{MODEL} never became {state}")


def test_unload_frees_the_model(server, export):
    def cycle() -> tuple[int, int]:
        assert httpx.post(f"{server.base_url}/api/models/{MODEL}/load", timeout=120).status_code == 200
        running = {m["id"]: m for m in httpx.get(server.base_url + "/api/ps").json()["models"]}
        assert running[MODEL]["backend"] == "onnx_runtime" and running[MODEL]["estimated_bytes"] > 0
        loaded = _rss(server)
        assert httpx.post(f"{server.base_url}/api/models/{MODEL}/unload").status_code == 200
        _wait_state(server, "unloaded")
        assert MODEL not in {m["id"] for m in httpx.get(server.base_url + "/api/ps").json()["models"]}
        time.sleep(0.5)  # the worker thread unloads after the router lets go
        return loaded, _rss(server)

    cycle()  # the first load also imports onnxruntime and transformers, which stay
    before = _rss(server)
    loaded, after = cycle()
    cycle()
    _, after_more = cycle()
    weights = (Path(server.log_path).parent / "models" / MODEL / "model.onnx").stat().st_size
    print(f"server RSS: {before >> 20} MiB before, {loaded >> 20} loaded, {after >> 20} after unload, "
          f"{after_more >> 20} after two more cycles")
    assert loaded - before > weights // 2  # the model was really resident...
    # ...and its memory went back: RSS ends within half of what a load takes (measured: -11 to +16 MiB of malloc
    # noise against ~85 MiB a load), also after three cycles (a model that stayed would add ~85 MiB each)
    assert after - before < (loaded - before) // 2
    assert after_more - before < (loaded - before) // 2
