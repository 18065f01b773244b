"""Native tokenizer endpoints: /api/models/{id}/tokenize and /detokenize."""
from __future__ import annotations

import msgspec

__all__ = ["TokenizeRequest", "TokenPiece", "TokenizeResponse", "DetokenizeRequest", "DetokenizeResponse"]


class TokenizeRequest(msgspec.Struct, kw_only=True):
    text: str
    special: bool = True  # parse special tokens such as <|im_start|> written in the text
    with_pieces: bool = False


class TokenPiece(msgspec.Struct):
    id: int
    piece: str


class TokenizeResponse(msgspec.Struct):
    model: str
    tokens: list[int]
    count: int
    pieces: list[TokenPiece] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: list[int]


class DetokenizeResponse(msgspec.Struct):
    model: str
    text: str
