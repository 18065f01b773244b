"""The per-token machinery of the hf_transformers decode loop besides the sampler (adapters/sampling.py):
each token id's exact bytes and JSON-schema constrained decoding.

The constraint goes through llguidance: a matcher per request masks, at every step, the tokens
that would stop the output from being a prefix of a JSON document valid for the schema. It works
on the HF tokenizer itself (no network, no vocabulary download), for any fast tokenizer."""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from adapters.errors import HINT_SCHEMA, InvalidInput
from adapters.tokens import byte_level_bytes

__all__ = [
    "JsonConstraint",
    "JsonConstraints",
    "constraints_available",
    "token_bytes_table",
]


def token_bytes_table(tokenizer, n_vocab: int) -> list[bytes]:
    """Each token id's exact bytes (special tokens render as nothing, as llama.cpp does), so
    streamed text, logprob bytes and stop strings never depend on how a piece is decoded."""
    backend = getattr(tokenizer, "backend_tokenizer", None)  # None: a slow (Python) tokenizer
    kinds = json.dumps(json.loads(backend.to_str()).get("decoder") or {}) if backend is not None else ""
    tokens = tokenizer.convert_ids_to_tokens(list(range(min(n_vocab, len(tokenizer)))))
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    table: list[bytes] = []
    byte_level = '"ByteLevel"' in kinds
    for i, token in enumerate(tokens):
        if token is None or i in special:
            table.append(b"")
        elif byte_level:
            raw = byte_level_bytes(token)
            table.append(raw if raw is not None else token.encode())
        elif token.startswith("<0x") and token.endswith(">") and len(token) == 6:  # sentencepiece byte fallback
            table.append(bytes([int(token[3:5], 16)]))
        elif '"Metaspace"' in kinds or '"▁"' in kinds:
            table.append(token.replace("▁", " ").encode())
        else:
            table.append(tokenizer.decode([i]).encode())
    table.extend(b"" for _ in range(n_vocab - len(table)))
    return table


# Compact JSON: no free whitespace between tokens, so a small model cannot wander off into
# endless blank lines and the output is what json.dumps(separators=(",", ":")) would give.
_COMPILE_OPTIONS = {"whitespace_flexible": False}


def constraints_available() -> bool:
    """Whether the constraint engine (the `llguidance` package) is installed."""
    try:
        import llguidance
        import llguidance.hf  # noqa: F401
    except ImportError:
        return False
    return True


class JsonConstraint:
    """One request's grammar state: mask() before sampling, advance(token) after."""

    def __init__(self, matcher, n_vocab: int) -> None:
        self._matcher = matcher
        self._n_vocab = n_vocab

    def allowed(self) -> np.ndarray:
        """A boolean mask over the model's vocabulary: True where the token keeps the output valid."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self._n_vocab].astype(bool)

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the JSON constraint rejected token {token}: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The document is finished: nothing but end-of-sequence may follow."""
        return self._matcher.is_stopped()


class JsonConstraints:
    """Builds JsonConstraints for one tokenizer: the llguidance view of the vocabulary is made
    once (about a second), each distinct schema is compiled once."""

    def __init__(self, hf_tokenizer, n_vocab: int, eos_token: int | None) -> None:
        import llguidance.hf

        self._n_vocab = n_vocab
        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=n_vocab, eos_token=eos_token)
        self._grammars: dict[str, str] = {}

    def start(self, schema: dict[str, Any]) -> JsonConstraint:
        import llguidance

        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_COMPILE_OPTIONS)
            except ValueError as exc:
                raise InvalidInput(f"Invalid or unsupported JSON schema: {exc}", hint=HINT_SCHEMA) from None
            self._grammars[key] = grammar
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            self._grammars.pop(key, None)
            raise InvalidInput(f"Invalid or unsupported JSON schema: {matcher.get_error()}",
                                      hint=HINT_SCHEMA)
        return JsonConstraint(matcher, self._n_vocab)
