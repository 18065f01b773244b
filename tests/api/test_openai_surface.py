"""The rest of the OpenAI surface on the default model, through the real SDK with strict
response validation: tools, structured output, logprobs, logit_bias, n, completions extras,
embeddings and the tokenizer endpoints."""
import json

import httpx
import jsonschema
import llama_cpp
import numpy as np
import openai
import pytest
from openai import OpenAI

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}}}
ASK = [{"role": "user", "content": "What's the weather like in Paris right now?"}]


def test_required_tool_call_is_a_valid_json_string_for_the_schema(client):
    resp = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER, TIME],
                                          tool_choice="required", temperature=0, max_tokens=64)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(call.function.arguments, str)
    schema = (WEATHER if call.function.name == "get_weather" else TIME)["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_streamed_named_tool_call_deltas(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    full = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                          temperature=0, max_tokens=64)
    chunks = list(client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER, TIME],
                                                 tool_choice=choice, temperature=0, max_tokens=64, stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    first, rest = deltas[0][0], [d[0] for d in deltas[1:]]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert len(rest) >= 2, "arguments should arrive as several fragments"
    assert all(d.index == 0 and d.id is None and d.type is None and d.function.name is None for d in rest)
    arguments = (first.function.arguments or "") + "".join(d.function.arguments for d in rest)
    assert arguments == full.choices[0].message.tool_calls[0].function.arguments
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert len({c.id for c in chunks}) == 1


def test_tool_conversation_replays_and_tool_choice_none_answers_in_text(client):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    resp = client.chat.completions.create(model="default", messages=messages, tools=[WEATHER], tool_choice="none",
                                          temperature=0, max_tokens=40)
    assert resp.choices[0].message.tool_calls is None
    assert resp.choices[0].message.content.strip()
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_json_object_and_json_schema_outputs_parse_and_validate(client):
    ask = "Give a JSON object with keys city and country for Paris."
    resp = client.chat.completions.create(model="default", temperature=0, max_tokens=200,
                                          messages=[{"role": "user", "content": ask}],
                                          response_format={"type": "json_object"})
    assert resp.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                               "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
              "required": ["name", "age", "tags"], "additionalProperties": False}
    for temperature in (0, 1.0):
        resp = client.chat.completions.create(
            model="default", temperature=temperature, seed=3, max_tokens=120,
            messages=[{"role": "user", "content": "Make up a pet."}],
            response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}})
        assert resp.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(resp.choices[0].message.content), schema)


def test_logprobs_match_the_models_log_softmax(client, raw_llama):
    """Each returned logprob is the raw model's log-softmax for that token, computed here
    independently; top_logprobs are the best alternatives, best first."""
    messages = [{"role": "user", "content": "Name three colors."}]
    resp = client.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=6,
                                          logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    prompt = raw_llama.tokenize(_render(raw_llama, messages).encode(), add_bos=False, special=True)
    raw_llama.reset()
    raw_llama.eval(prompt)
    for item in content:
        last = llama_cpp.llama_get_logits(raw_llama.ctx)  # the C API's logits of the last evaluated token
        logits = np.ctypeslib.as_array(last, shape=(raw_llama.n_vocab(),)).astype(np.float64)
        logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        best = np.argsort(-logp)[:3]
        assert [t.bytes for t in item.top_logprobs] == [list(raw_llama.detokenize([int(i)])) for i in best]
        assert [t.logprob for t in item.top_logprobs] == pytest.approx([logp[i] for i in best], abs=2e-3)
        assert item.logprob == pytest.approx(logp[best[0]], abs=2e-3)  # greedy: the best token
        assert item.bytes == list(item.token.encode())
        raw_llama.eval([int(best[0])])
    raw_llama.reset()


def _render(llm, messages):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    eos = llm._model.token_get_text(llm.token_eos())
    return Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token="")(
        messages=messages).prompt


def test_logit_bias_forces_and_validates(client, raw_llama):
    (token,) = raw_llama.tokenize(b" banana", add_bos=False)
    resp = client.chat.completions.create(model="default", messages=ASK, temperature=0, max_tokens=3,
                                          logit_bias={str(token): 100})
    assert resp.choices[0].message.content == " banana" * 3
    banned = client.chat.completions.create(model="default", messages=ASK, temperature=0, max_tokens=8)
    first = raw_llama.tokenize(banned.choices[0].message.content.encode(), add_bos=False)[0]
    without = client.chat.completions.create(model="default", messages=ASK, temperature=0, max_tokens=8,
                                             logit_bias={str(first): -100})
    assert not without.choices[0].message.content.startswith(banned.choices[0].message.content[:3])
    for bias, param in (({"99999999": 1}, "logit_bias"), ({"5": 101}, "logit_bias")):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="default", messages=ASK, logit_bias=bias)
        assert info.value.body["param"] == param


def test_n_choices_are_indexed_distinct_and_reproducible_with_a_seed(client):
    kwargs = dict(model="default", messages=[{"role": "user", "content": "Tell me a story."}], n=3, seed=11,
                  temperature=1.0, max_tokens=12)
    a, b = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1
    assert a.usage.completion_tokens == 3 * 12 or any(c.finish_reason == "stop" for c in a.choices)
    streamed = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
    assert [streamed[i] for i in range(3)] == texts


def test_unknown_and_ignored_fields_are_accepted(client):
    resp = client.chat.completions.create(model="default", messages=ASK, max_tokens=4, user="u-1", store=True,
                                          metadata={"k": "v"}, extra_body={"some_future_field": {"x": 1}})
    assert resp.choices[0].message.content


def test_completions_echo_logprobs_n_and_suffix(client, server):
    lenient = OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
    prompt = "One, two, three,"
    plain = client.completions.create(model="default", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == plain.usage.completion_tokens
    assert "".join(lp.tokens) == plain.choices[0].text
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    echoed = client.completions.create(model="default", prompt=prompt, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    # OpenAI scores an echoed prompt with null for its first token, which the SDK's types do not allow.
    scored = lenient.completions.create(model="default", prompt=prompt, max_tokens=5, temperature=0, echo=True,
                                        logprobs=1).choices[0].logprobs
    assert scored.token_logprobs[0] is None
    assert all(isinstance(x, float) and x <= 0 for x in scored.token_logprobs[1:])
    assert "".join(scored.tokens) == prompt + plain.choices[0].text
    assert scored.token_logprobs[-5:] == pytest.approx(lp.token_logprobs, abs=2e-3)
    many = client.completions.create(model="default", prompt=[prompt, "Red, green,"], n=2, max_tokens=4, seed=1)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="default", prompt="def add(a, b):", suffix="    return c", max_tokens=4)
    assert info.value.body["param"] == "suffix" and "infill" in info.value.body["message"]


PARAPHRASES = [
    ("The cat is sleeping on the sofa.", "A cat naps on the couch.", "Interest rates rose by half a percent."),
    ("How do I bake bread at home?", "What is a good recipe for homemade bread?", "The football match ended in a draw."),
    ("She plays the piano beautifully.", "Her piano playing is lovely.", "The server returned an error code."),
]


def test_embeddings_are_real_model_embeddings(client, server):
    vectors = lambda texts: np.array([d.embedding for d in client.embeddings.create(  # noqa: E731
        model="default", input=texts, encoding_format="float").data])
    for a, b, unrelated in PARAPHRASES:
        v = vectors([a, b, unrelated])
        assert v.shape == (3, 576)
        assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
        assert v[0] @ v[1] > v[0] @ v[2] and v[0] @ v[1] > v[1] @ v[2]
    again = vectors([PARAPHRASES[0][0]])[0]
    assert np.allclose(again, vectors(list(PARAPHRASES[0]))[0], atol=1e-5)
    # The SDK asks for base64 by default and decodes it (its strict types expect lists, hence lenient).
    lenient = OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
    b64 = lenient.embeddings.create(model="default", input=PARAPHRASES[0][0])
    assert np.allclose(np.array(b64.data[0].embedding), again, atol=1e-6)
    tokens = httpx.post(server.base_url + "/api/models/default/tokenize", json={"text": PARAPHRASES[0][0]}).json()
    by_ids = client.embeddings.create(model="default", input=tokens["tokens"], encoding_format="float")
    assert np.allclose(np.array(by_ids.data[0].embedding), again, atol=1e-4)
    assert by_ids.usage.prompt_tokens == tokens["count"]
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="default", input="x", dimensions=64, encoding_format="float")
    assert info.value.body["param"] == "dimensions"


def test_tokenize_and_detokenize_round_trip(server, raw_llama):
    base = server.base_url + "/api/models/default"
    text = "Hello world, <|im_start|> héllo"
    r = httpx.post(base + "/tokenize", json={"text": text, "with_pieces": True}).json()
    assert r["tokens"] == raw_llama.tokenize(text.encode(), add_bos=False, special=True)
    assert r["count"] == len(r["tokens"]) and [p["id"] for p in r["pieces"]] == r["tokens"]
    assert r["pieces"][0]["piece"] == "Hello"
    back = httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["text"] == text.replace("<|im_start|>", "")  # special tokens are not text
    plain = httpx.post(base + "/tokenize", json={"text": "<|im_start|>", "special": False}).json()
    assert len(plain["tokens"]) > 1
    bad = httpx.post(base + "/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
