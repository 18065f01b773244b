"""The sampler of the local decode loops (onnx_runtime, hf_transformers): one specification built
from GenerateParams, the one order its stages run in, and one numpy implementation of it.

hf_transformers hands its torch logits over as a numpy view (they are float32 on the CPU already),
so both backends turn the same logits, parameters and seed into the same token. The llama_cpp
backend samples inside llama.cpp, in the same order (see STAGES)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
import numpy as np

from adapters.base import GenerateParams
from adapters.errors import HINT_LOGIT_BIAS
from adapters.tokens import check_token_ids

__all__ = ["PENALTY_LAST_N", "STAGES", "Sampler", "SamplerSpec"]

PENALTY_LAST_N = 64  # as llama.cpp (penalty_last_n): repeat/frequency/presence penalties look at the last 64 tokens

# The order of the stages, llama.cpp's:
# - llama.cpp common/sampling.cpp, common_sampler_init(): logit_bias is added to the chain first, then
#   common_params_sampling::samplers in their default order (common/common.h): penalties, dry,
#   top_n_sigma, top_k, typical_p, top_p, min_p, xtc, temperature; then dist draws the token.
# - llama-cpp-python's Llama._init_sampler(), which the llama_cpp backend samples through: the
#   logits_processor (how that backend applies logit_bias and ignore_eos) first, then penalties, the
#   grammar, then greedy when temp == 0, else top_k, typical, top_p, min_p, temp, dist.
# dry, top_n_sigma, typical_p and xtc are off by default there and not offered here. The constraint
# (hf_transformers' JSON-schema mask) stands where llama-cpp-python puts the grammar. Greedy
# (temperature <= 0, or top_k == 1) is the argmax after the constraint: top_k..min_p never drop the
# best token and a temperature <= 0 keeps only it (llama.cpp's temp sampler), so nothing else runs.
STAGES = ("logit_bias", "penalties", "constraint", "top_k", "top_p", "min_p", "temperature", "dist")


class SamplerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What one request asks of the sampler, checked against the vocabulary; see STAGES for the order."""

    temperature: float = 1.0  # <= 0: greedy
    top_k: int = 0  # 0: off; 1: greedy
    top_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off; divides a seen token's positive logit, multiplies a negative one
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the window
    presence_penalty: float = 0.0  # subtracted once from every token in the window
    penalty_last_n: int = PENALTY_LAST_N  # the window: the last n tokens of prompt + output
    logit_bias: dict[int, float] = {}  # token id -> added to its logit
    ignore_eos: bool = False  # eos ids get a logit of -inf
    eos: tuple[int, ...] = ()
    seed: int | None = None  # None: a fresh seed from the OS

    @classmethod
    def from_params(cls, params: GenerateParams, n_vocab: int, eos: Sequence[int] = ()) -> SamplerSpec:
        """The spec of a request; InvalidInput (hint logit_bias) for a bias on a token outside the vocabulary."""
        check_token_ids(params.logit_bias, n_vocab, HINT_LOGIT_BIAS)
        return cls(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                   repeat_penalty=params.repeat_penalty, frequency_penalty=params.frequency_penalty,
                   presence_penalty=params.presence_penalty, logit_bias=dict(params.logit_bias),
                   ignore_eos=params.ignore_eos, eos=tuple(eos), seed=params.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1

    @property
    def penalizes(self) -> bool:
        return self.penalty_last_n > 0 and (
            self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0)

    def biases(self) -> dict[int, float]:
        """logit_bias with ignore_eos folded in (as llama.cpp's logit_bias_eog)."""
        bias = dict(self.logit_bias)
        if self.ignore_eos:
            bias.update({t: -math.inf for t in self.eos})
        return bias


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


class Sampler:
    """One request's sampler: call it with each position's raw logits for the next token, and
    accept() the token the loop keeps (it joins the penalty window). Logits go through STAGES in
    float64; the draw comes from the request's own numpy Generator, so the same seed and request
    give the same tokens."""

    def __init__(self, params: GenerateParams, n_vocab: int, eos: Sequence[int] = (),
                 context: Sequence[int] = ()) -> None:
        self.spec = spec = SamplerSpec.from_params(params, n_vocab, eos)
        self.rng = np.random.default_rng(spec.seed)
        self.history = list(context[-spec.penalty_last_n:]) if spec.penalty_last_n > 0 else []
        bias = spec.biases()
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self._bias_values = np.fromiter(bias.values(), dtype=np.float64, count=len(bias))

    def accept(self, token: int) -> None:
        if self.spec.penalty_last_n > 0:
            self.history.append(token)
            del self.history[:-self.spec.penalty_last_n]

    def _penalize(self, x: np.ndarray) -> None:
        s = self.spec
        if not self.history or not s.penalizes:
            return
        ids, counts = np.unique(np.asarray(self.history), return_counts=True)
        inside = ids < len(x)  # a tokenizer may know ids the model has no logit for
        ids, counts = ids[inside], counts[inside]
        if s.repeat_penalty != 1.0:
            seen = x[ids]
            x[ids] = np.where(seen > 0, seen / s.repeat_penalty, seen * s.repeat_penalty)
        x[ids] -= counts * s.frequency_penalty + s.presence_penalty

    def scores(self, logits, allowed: np.ndarray | None = None) -> np.ndarray:
        """logit_bias, penalties and the constraint on a float64 copy of one position's raw logits (a 1-D
        float array, left untouched). allowed: a boolean mask over the vocabulary, or None."""
        x = np.array(logits, dtype=np.float64)
        if len(self._bias_ids):  # logit_bias
            x[self._bias_ids] += self._bias_values
        self._penalize(x)  # penalties
        if allowed is not None:  # constraint
            x[~allowed] = -np.inf
        return x

    def distribution(self, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """top_k, top_p, min_p and temperature on scores(): (ids, probabilities) to draw from, best
        first when top_p or min_p sorted them; ids None: every token, in id order."""
        s = self.spec
        ids, values = None, x
        if 0 < s.top_k < len(x):  # top_k
            ids = np.argpartition(-x, s.top_k - 1)[:s.top_k]
            values = x[ids]
        if s.top_p < 1.0 or s.min_p > 0.0:  # top_p, min_p: on the distribution at temperature 1
            order = np.argsort(-values, kind="stable")
            ids, values = (order if ids is None else ids[order]), values[order]
            probs = _softmax(values)
            keep = len(values)
            if s.top_p < 1.0:  # the most likely tokens until their mass reaches top_p
                keep = min(keep, int(np.searchsorted(np.cumsum(probs), s.top_p)) + 1)
            if s.min_p > 0.0:  # the tokens at least min_p times as likely as the best
                keep = min(keep, max(1, int(np.count_nonzero(probs >= s.min_p * probs[0]))))
            ids, values = ids[:keep], values[:keep]
        return ids, _softmax(values / s.temperature)  # temperature

    def __call__(self, logits, allowed: np.ndarray | None = None) -> int:
        """The next token from one position's raw logits (see scores())."""
        x = self.scores(logits, allowed)
        if self.spec.greedy:
            return int(np.argmax(x))
        ids, probs = self.distribution(x)
        pick = int(self.rng.choice(len(probs), p=probs))  # dist
        return pick if ids is None else int(ids[pick])
