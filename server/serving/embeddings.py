"""/v1/embeddings: inputs -> texts, vectors -> float lists or base64, `dimensions` checked."""
from __future__ import annotations

import base64

import numpy as np

from server.errors import InvalidRequestError
from server.protocol.embeddings import (
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
)
from server.runtime import Lease

__all__ = ["embed"]


def _texts(req: EmbeddingRequest) -> tuple[list[str], list[list[int]]]:
    """(texts, token arrays): exactly one of them is non-empty."""
    if isinstance(req.input, str):
        return [req.input], []
    items = req.input
    if all(isinstance(i, str) for i in items):
        return list(items), []
    if all(isinstance(i, int) for i in items):
        return [], [list(items)]
    if all(isinstance(i, list) for i in items):
        return [], list(items)
    raise InvalidRequestError("`input` must be a string, a list of strings, a token array or a list of token "
                              "arrays, not a mix.", param="input")


def _encode(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


async def embed(worker: Lease, req: EmbeddingRequest) -> EmbeddingList:
    texts, token_arrays = _texts(req)
    if any(not text for text in texts):
        raise InvalidRequestError("`input` must not contain empty strings.", param="input")

    def run(adapter):
        inputs = texts or [adapter.detokenize(ids) for ids in token_arrays]
        return adapter.embed(inputs)

    vectors, n_tokens = await worker.call(run)
    matrix = np.asarray(vectors, dtype=np.float32)
    native = matrix.shape[1]
    if req.dimensions is not None and req.dimensions != native:
        # Cutting a vector short only keeps meaning for models trained for it (Matryoshka).
        if "matryoshka" not in worker.adapter.manifest.capabilities or req.dimensions > native:
            raise InvalidRequestError(f"Model `{worker.adapter.id}` gives {native}-dimensional embeddings and "
                                      f"cannot shorten them to {req.dimensions}.", param="dimensions")
        matrix = matrix[:, : req.dimensions]
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    data = [Embedding(index=i, embedding=_encode(v, req.encoding_format)) for i, v in enumerate(matrix)]
    return EmbeddingList(data=data, model=worker.adapter.id, usage=EmbeddingUsage(n_tokens, n_tokens))
