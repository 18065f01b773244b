"""The llama.cpp prompt cache reuses only what cannot change a result: the same prompt gives the
same logits whatever ran before it, and a long shared prefix is still reused."""
import numpy as np
import pytest

from adapters.llama_cpp import open_llama
from adapters.llama_prompt_cache import CHUNK, PromptCache


@pytest.fixture(scope="module")
def llm(default_gguf):
    model = open_llama(str(default_gguf), n_ctx=2048, n_batch=512, verbose=False)
    yield model
    model.close()


def _logits(llm) -> np.ndarray:
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy()


def test_the_same_prompt_gives_identical_logits_whatever_ran_before(llm):
    system = llm.tokenize(b"You are a careful assistant. " * 70, add_bos=False)  # > one chunk
    assert len(system) > 2 * CHUNK
    a = system + llm.tokenize(b" Question: what is the capital of France? Answer:", add_bos=False)
    b = system + llm.tokenize(b" Question: name a red fruit. Answer:", add_bos=False)
    short = llm.tokenize(b"Tell me a story about a cat.", add_bos=False)
    cache = PromptCache(llm)
    cache.reset()
    assert cache.prefill(a) == 0
    fresh_a = _logits(llm)
    llm.eval(llm.tokenize(b" Paris, and then", add_bos=False))  # generated tokens after the prompt
    reused = cache.prefill(b)
    assert reused == (len(system) // CHUNK) * CHUNK > 0  # the shared system prompt's whole chunks
    assert cache.prefill(a) == reused  # a again, on the chunks b's evaluation left: the same logits
    assert np.array_equal(_logits(llm), fresh_a)
    cache.prefill(short)
    fresh_short = _logits(llm)
    assert cache.prefill(short) == len(short) - 1  # a repeated prompt: only its last token is decoded
    for prompt, fresh in ((a, fresh_a), (short, fresh_short), (a, fresh_a)):
        cache.prefill(prompt)
        assert np.array_equal(_logits(llm), fresh), "a cached prompt must give the fresh prompt's logits"
    cache.reset()
    cache.prefill(a)
    assert np.array_equal(_logits(llm), fresh_a)


def test_segments_are_canonical_chunks_then_the_rest_then_the_last_token():
    from adapters.llama_prompt_cache import segments

    assert segments(1, 4) == [1]
    assert segments(2, 4) == [1, 2]
    assert segments(5, 4) == [4, 5]
    assert segments(6, 4) == [4, 5, 6]
    assert segments(10, 4) == [4, 8, 9, 10]
    assert segments(0, 4) == []
