"""Grammar-constrained sampling for llama.cpp, checked lazily the way llama.cpp's own server does it
(common_sampler_sample): sample from the unconstrained chain, check only that one token against the
grammar, and run the grammar over the whole vocabulary only when the token is rejected.

llama-cpp-python puts the grammar sampler inside the chain, where it tests all ~49k candidates every
token: json_schema decoding ran at 0.58x the tokens/s of free decoding on the default model, 0.77x
this way (bench/constrained_bench.py; SmolLM2 still proposes a rejected token about every other step).
Greedy output is the same either way: the unconstrained argmax is kept only when the grammar allows
it, and otherwise the argmax of the allowed tokens is taken, as before."""
from __future__ import annotations

import ctypes
import json
import math
from functools import lru_cache

import numpy as np

__all__ = ["LazyGrammarSampler", "json_schema_grammar", "lazy_grammar_llama"]

# llama-cpp-python's JSON-schema converter lets strings hold raw control characters, which JSON forbids (a
# sampled newline inside a string made invalid JSON); llama.cpp's own converter excludes them. (Its whitespace
# rule, newlines and up to 20 spaces or tabs, is not taken: SmolLM2 then pads the object with tabs.)
_RULES = {r'char ::= [^"\\] |': r'char ::= [^"\\\x7F\x00-\x1F] |'}


def json_schema_grammar(schema: dict):
    """A LlamaGrammar whose every complete output is JSON that json.loads accepts (ValueError and friends for
    schemas the converter cannot express)."""
    from llama_cpp.llama_grammar import LlamaGrammar

    lines = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)._grammar.splitlines()
    for i, line in enumerate(lines):
        for theirs, ours in _RULES.items():
            if line.startswith(theirs):
                lines[i] = ours + line[len(theirs):]
    return LlamaGrammar.from_string("\n".join(lines), verbose=False)


@lru_cache(maxsize=1)
def lazy_grammar_llama() -> type:
    """llama_cpp.Llama whose generate(grammar=...) samples through LazyGrammarSampler."""
    import llama_cpp

    class LazyGrammarLlama(llama_cpp.Llama):
        def _init_sampler(self, *args, grammar=None, **kwargs):
            chain = super()._init_sampler(*args, **kwargs)
            return chain if grammar is None else LazyGrammarSampler(self, chain, grammar)

    return LazyGrammarLlama


class LazyGrammarSampler:
    """Stands in for llama-cpp-python's LlamaSampler in Llama.sample(): sample(ctx, idx) -> token."""

    def __init__(self, llm, chain, grammar) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._chain = chain  # the LlamaSampler without the grammar: penalties, processors, top-k/p, temp, dist
        self._grammar = llama_cpp.llama_sampler_init_grammar(
            llm._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
        if not self._grammar:
            raise ValueError("llama.cpp could not parse the grammar")
        self._n_vocab = llm.n_vocab()
        dtype = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)
        assert dtype.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)
        self._candidates = np.zeros(self._n_vocab, dtype=dtype)
        self._one = llama_cpp.llama_token_data()
        self.resampled = 0  # tokens the grammar rejected, so the whole vocabulary went through it

    def sample(self, ctx, idx: int = -1) -> int:
        lib = self._lib
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx.ctx, idx), shape=(self._n_vocab,))
        token = self._apply(self._chain.sampler, logits)
        if not self._allowed(token):  # resample with the grammar first, then the same chain
            self.resampled += 1
            token = self._apply(self._chain.sampler, logits, grammar_first=True)
        lib.llama_sampler_accept(self._chain.sampler, token)
        lib.llama_sampler_accept(self._grammar, token)
        return token

    def _apply(self, sampler, logits: np.ndarray, grammar_first: bool = False) -> int:
        """Run the sampler over every token's logit (as llama_sampler_sample does) and return its pick."""
        lib, cands = self._lib, self._candidates
        cands["id"] = np.arange(self._n_vocab, dtype=np.intc)  # samplers sort and truncate in place
        cands["logit"] = logits
        cands["p"] = 0.0
        array = lib.llama_token_data_array(cands.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)),
                                           self._n_vocab, -1, False)
        if grammar_first:
            lib.llama_sampler_apply(self._grammar, ctypes.byref(array))
        lib.llama_sampler_apply(sampler, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise RuntimeError("the sampler chain selected no token")
        return int(array.data[array.selected].id)

    def _allowed(self, token: int) -> bool:
        one = self._one
        one.id, one.logit, one.p = token, 1.0, 0.0
        array = self._lib.llama_token_data_array(ctypes.pointer(one), 1, -1, False)
        self._lib.llama_sampler_apply(self._grammar, ctypes.byref(array))
        return not math.isinf(one.logit)

    def close(self) -> None:
        if self._grammar:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None
        self._chain.close()

    def __del__(self) -> None:
        self.close()
