"""Token helpers the local backends share: GPT-2's byte-level alphabet and the vocabulary bounds check."""
from __future__ import annotations

from collections.abc import Iterable

from adapters.errors import HINT_LOGIT_BIAS, HINT_TOKENS, InvalidInput

__all__ = ["BYTE_TO_UNICODE", "UNICODE_TO_BYTE", "byte_level_bytes", "check_token_ids"]


def _gpt2_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte -> the printable character a byte-level BPE token
    spells it with. Printable Latin-1 bytes stand for themselves; the 68 others (controls, space,
    DEL, NBSP, soft hyphen...) take U+0100 onwards in byte order, so a space is "Ġ" and "\\n" is "Ċ"."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_UNICODE: dict[int, str] = _gpt2_alphabet()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in BYTE_TO_UNICODE.items()}


def byte_level_bytes(token: str) -> bytes | None:
    """The bytes a byte-level BPE token string stands for; None when it holds a character outside
    the alphabet (an added token written as plain text)."""
    try:
        return bytes(UNICODE_TO_BYTE[c] for c in token)
    except KeyError:
        return None


# What each hint calls the ids it checks, in the error message.
_NAMES = {HINT_TOKENS: "Token id", HINT_LOGIT_BIAS: "logit_bias token"}


def check_token_ids(ids: Iterable[int], n_vocab: int, hint: str = HINT_TOKENS) -> None:
    """Refuse the first id outside 0..n_vocab-1 (InvalidInput with `hint`): llama.cpp reads out of
    bounds on unknown ids and numpy/torch indexing would raise or wrap around on them."""
    bad = next((t for t in ids if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidInput(f"{_NAMES.get(hint, 'Token id')} {bad} is outside the vocabulary (0..{n_vocab - 1}).",
                           hint=hint)
