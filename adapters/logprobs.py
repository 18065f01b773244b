"""Log-probabilities from raw logits, backend-neutral (numpy): the model's real log-softmax."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from adapters.base import TokenLogprob, TopLogprob

__all__ = ["log_softmax", "token_logprob"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    row = logits.astype(np.float64, copy=False)
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


def token_logprob(logits: np.ndarray, token: int, top: int, piece: Callable[[int], bytes]) -> TokenLogprob:
    """The chosen token's log-probability and the `top` most likely alternatives, best first."""
    logp = log_softmax(logits)
    alternatives: list[TopLogprob] = []
    if top > 0:
        best = np.argpartition(-logp, top - 1)[:top]
        for t in best[np.argsort(-logp[best])]:
            raw = piece(int(t))
            alternatives.append(TopLogprob(raw.decode("utf-8", errors="replace"), float(logp[t]), list(raw)))
    raw = piece(token)
    return TokenLogprob(raw.decode("utf-8", errors="replace"), float(logp[token]), list(raw), alternatives)
