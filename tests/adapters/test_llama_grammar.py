"""adapters.llama_grammar on the default model: grammar checked one sampled token at a time gives the same
greedy output as llama-cpp-python's in-chain grammar, and sampled outputs always parse and validate."""
import json

import jsonschema
import llama_cpp
import pytest

from adapters.llama_cpp import open_llama
from adapters.llama_grammar import json_schema_grammar, lazy_grammar_llama

PET = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
       "required": ["name", "age", "tags"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def lazy_llama(default_gguf):
    llm = open_llama(str(default_gguf), n_ctx=2048, n_threads=2, verbose=False, cls=lazy_grammar_llama())
    yield llm
    llm.close()


def generate(llm, prompt: str, schema: dict, temp: float = 0.0, seed: int = 0, limit: int = 150,
             **sampling) -> list[int]:
    llm.set_seed(seed)
    out = []
    sampling = {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0} | sampling
    for token in llm.generate(llm.tokenize(prompt.encode(), special=True), temp=temp,
                              grammar=json_schema_grammar(schema), **sampling):
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(out) >= limit:
            break
        out.append(token)
    return out


def bias_quotes_and_digits(input_ids, logits):
    """A logit_bias-like processor: it changes which tokens greedy prefers, inside the chain."""
    logits[[1, 2, 3, 17, 18, 19, 33, 34]] += 4.0
    return logits


PENALTIES = {"repeat_penalty": 1.3, "frequency_penalty": 0.4, "presence_penalty": -0.6,
             "logits_processor": [bias_quotes_and_digits]}


@pytest.mark.parametrize(("prompt", "schema", "sampling"), [
    (chat("Make up a pet."), PET, {}),
    (chat("What's the weather in Paris?"), WEATHER, {}),
    (chat("Make up a pet."), PET, PENALTIES),  # logits changed in place before greedy picks
])
def test_greedy_output_is_token_for_token_the_in_chain_grammars(raw_llama, lazy_llama, prompt, schema, sampling):
    expected = generate(raw_llama, prompt, schema, **sampling)  # llama-cpp-python's sampler: grammar over all
    got = generate(lazy_llama, prompt, schema, **sampling)
    assert got == expected
    assert lazy_llama._sampler.resampled > 0  # the shortlist path ran
    jsonschema.validate(json.loads(lazy_llama.detokenize(got)), schema)


def test_sampled_outputs_parse_and_validate_and_the_fallback_runs(lazy_llama):
    """Hot sampling picks many tokens the grammar rejects: each is resampled under the grammar. Raw control
    characters inside strings are rejected too (llama-cpp-python's own converter lets them through)."""
    resampled = 0
    for seed in range(6):
        tokens = generate(lazy_llama, chat("Make up a pet."), PET, temp=1.5, seed=seed)
        assert len(tokens) < 150, "the grammar never closed the object"
        jsonschema.validate(json.loads(lazy_llama.detokenize(tokens)), PET)
        resampled += lazy_llama._sampler.resampled
    assert resampled > 0


@pytest.mark.parametrize("schema", [PET, {"type": "object"}])
def test_strings_exclude_control_characters(schema):
    rules = dict(line.split(" ::= ", 1) for line in json_schema_grammar(schema)._grammar.splitlines())
    assert rules["char"].startswith(r'[^"\\\x7F\x00-\x1F] |')
