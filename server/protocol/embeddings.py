"""Embeddings (/v1/embeddings), as OpenAI names them."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

__all__ = ["EmbeddingRequest", "Embedding", "EmbeddingUsage", "EmbeddingList"]

# A string, a list of strings, one token-id array, or a list of token-id arrays.
EmbeddingInput = str | Annotated[list[str | int | list[int]], msgspec.Meta(min_length=1, max_length=2048)]


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None
    keep_alive: str | float | None = None  # Ollama's: how long the model stays loaded after this request


class Embedding(msgspec.Struct):
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 when asked
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: Literal["list"] = "list"
