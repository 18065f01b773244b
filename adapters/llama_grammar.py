"""Grammar-constrained sampling for llama.cpp, checked lazily the way llama.cpp's own server does it
(common_sampler_sample): sample from the unconstrained chain, check only that one token against the
grammar, and run the grammar over the whole vocabulary only when the token is rejected.

llama-cpp-python puts the grammar sampler inside the chain, where it tests all ~49k candidates every
token. SmolLM2 still proposes a rejected token about every other step under a JSON schema, so under
greedy decoding a rejection first checks the 1024 best tokens, and only if none is allowed all of
them. bench/constrained_bench.py, json_schema vs free decoding: 0.58x in-chain, 0.69-0.79x with the
one-token check, 0.83-0.89x with the greedy shortlist too.
Greedy output is token for token the in-chain grammar's (tested, with logit processors and penalties
too): the unconstrained argmax is kept only when the grammar allows it, else the best allowed token."""
from __future__ import annotations

import ctypes
import json
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
            greedy = kwargs.get("temp") == 0.0  # llama-cpp-python's chain is then processors, penalties, greedy
            return chain if grammar is None else LazyGrammarSampler(self, chain, grammar, greedy=greedy)

    return LazyGrammarLlama


class LazyGrammarSampler:
    """Stands in for llama-cpp-python's LlamaSampler in Llama.sample(): sample(ctx, idx) -> token."""

    # greedy, on a rejection: the best tokens checked before all ~49k (in bench/constrained_bench.py 15 of 85
    # rejections still need all)
    GREEDY_SHORTLIST = 1024

    def __init__(self, llm, chain, grammar, greedy: bool = False) -> None:
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
        self._one = np.zeros(1, dtype=dtype)
        self._greedy = greedy
        self._shortlist = np.zeros(min(self.GREEDY_SHORTLIST, self._n_vocab), dtype=dtype)
        self.resampled = 0  # sampled tokens the grammar rejected

    def sample(self, ctx, idx: int = -1) -> int:
        lib = self._lib
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx.ctx, idx), shape=(self._n_vocab,))
        token = self._apply(self._chain.sampler, logits)
        if not self._allowed(token):
            self.resampled += 1
            best = self._best_allowed() if self._greedy else None
            if best is None:  # resample with the grammar over every token first, then the same chain
                best = self._apply(self._chain.sampler, logits, grammar_first=True)
            token = best
        lib.llama_sampler_accept(self._chain.sampler, token)
        lib.llama_sampler_accept(self._grammar, token)
        return token

    def _apply(self, sampler, logits: np.ndarray, grammar_first: bool = False) -> int:
        """Run the sampler over every token's logit (as llama_sampler_sample does) and return its pick."""
        lib, cands = self._lib, self._candidates
        cands["id"] = np.arange(self._n_vocab, dtype=np.intc)  # samplers sort and truncate in place
        cands["logit"] = logits
        cands["p"] = 0.0
        if grammar_first:
            self._apply_grammar(cands)
        array = lib.llama_token_data_array(cands.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)),
                                           self._n_vocab, -1, False)
        lib.llama_sampler_apply(sampler, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise RuntimeError("the sampler chain selected no token")
        return int(array.data[array.selected].id)

    def _best_allowed(self) -> int | None:
        """Greedy only: the allowed token with the highest logit among the GREEDY_SHORTLIST best, or None.

        The greedy chain changes logits in place (logit_bias, penalties) and never reorders them, so the
        candidates still hold the logits greedy chose from; the grammar only masks tokens, so the best allowed
        token there is what grammar-then-chain picks (ties: the lowest id, like llama.cpp's greedy)."""
        processed, shortlist = self._candidates["logit"], self._shortlist
        n = len(shortlist)
        top = np.argpartition(-processed, n - 1)[:n]
        shortlist["id"] = top[np.lexsort((top, -processed[top]))]  # best first, lower id first on ties
        shortlist["logit"], shortlist["p"] = 1.0, 0.0
        self._apply_grammar(shortlist)
        allowed = np.flatnonzero(np.isfinite(shortlist["logit"]))
        return int(shortlist["id"][allowed[0]]) if len(allowed) else None

    def _apply_grammar(self, candidates: np.ndarray) -> None:
        """The grammar over these candidates, in place: the tokens it rejects get a logit of -inf."""
        lib = self._lib
        array = lib.llama_token_data_array(candidates.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)),
                                           len(candidates), -1, False)
        lib.llama_sampler_apply(self._grammar, ctypes.byref(array))

    def _allowed(self, token: int) -> bool:
        one = self._one
        one["id"], one["logit"], one["p"] = token, 1.0, 0.0
        self._apply_grammar(one)
        return bool(np.isfinite(one["logit"][0]))

    def close(self) -> None:
        if self._grammar:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None
        self._chain.close()

    def __del__(self) -> None:
        self.close()
