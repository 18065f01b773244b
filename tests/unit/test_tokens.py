"""adapters/tokens.py: GPT-2's byte-level alphabet and the vocabulary bounds check every local backend uses."""
import pytest

from adapters.errors import HINT_LOGIT_BIAS, HINT_TOKENS, InvalidInput
from adapters.tokens import BYTE_TO_UNICODE, UNICODE_TO_BYTE, byte_level_bytes, check_token_ids


def test_byte_table_round_trips_all_256_bytes():
    assert sorted(BYTE_TO_UNICODE) == list(range(256))
    assert len(set(BYTE_TO_UNICODE.values())) == 256  # one character per byte
    assert all(UNICODE_TO_BYTE[BYTE_TO_UNICODE[b]] == b for b in range(256))
    every = bytes(range(256))
    assert byte_level_bytes("".join(BYTE_TO_UNICODE[b] for b in every)) == every


def test_byte_table_is_gpt2s():
    assert BYTE_TO_UNICODE[ord("a")] == "a" and BYTE_TO_UNICODE[ord("~")] == "~"
    assert BYTE_TO_UNICODE[ord(" ")] == "Ġ" and BYTE_TO_UNICODE[ord("\n")] == "Ċ" and BYTE_TO_UNICODE[0] == "Ā"
    assert BYTE_TO_UNICODE[0xAD] == "Ń"  # the soft hyphen, the last byte outside the printable ranges
    assert byte_level_bytes("ĠhÃ©llo") == " héllo".encode()
    assert byte_level_bytes("<|im_start|>") == b"<|im_start|>"
    assert byte_level_bytes("") == b""
    assert byte_level_bytes("a▁b") is None  # a character no byte maps to


@pytest.mark.parametrize(("hint", "message"), [
    (HINT_TOKENS, "Token id {bad} is outside the vocabulary (0..99)."),
    (HINT_LOGIT_BIAS, "logit_bias token {bad} is outside the vocabulary (0..99)."),
])
def test_bounds_check_names_the_first_bad_id_and_the_hint(hint, message):
    check_token_ids([0, 5, 99], 100, hint)
    check_token_ids({}, 100, hint)  # a logit_bias dict: its keys are checked
    for ids, bad in (([3, 100, -1], 100), ([-1], -1), ({7: 1.0, 1000: -5.0}, 1000)):
        with pytest.raises(InvalidInput) as raised:
            check_token_ids(ids, 100, hint)
        assert raised.value.message == message.format(bad=bad)
        assert raised.value.hint == hint
