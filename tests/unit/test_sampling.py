"""adapters/sampling.py: the sampler onnx_runtime and hf_transformers share, checked against an
independent torch implementation of llama.cpp's chain (full-vocabulary -inf masking, the way
hf_transformers sampled before), its stage order pinned, seeds reproducible. No model needed."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from adapters.base import GenerateParams
from adapters.errors import HINT_LOGIT_BIAS, InvalidInput
from adapters.sampling import PENALTY_LAST_N, STAGES, Sampler

V = 2000
EOS = [7]


def _logits(seed: int, n: int = V) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 3).astype(np.float32)


def _history(seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [*rng.integers(0, 50, 70).tolist(), *rng.integers(0, V, 30).tolist()]  # repeats, and > 64 tokens


def _full(ids, probs: np.ndarray) -> np.ndarray:
    """A distribution() result over the whole vocabulary."""
    if ids is None:
        return probs
    out = np.zeros(V)
    out[ids] = probs
    return out


def _torch_reference(logits: np.ndarray, p: GenerateParams, history: list[int], allowed=None):
    """llama.cpp's chain written on torch, independently: (the greedy token or None, the distribution
    over the whole vocabulary the token is drawn from)."""
    torch = pytest.importorskip("torch")
    x = torch.tensor(logits, dtype=torch.float64)
    bias = {**p.logit_bias, **({t: float("-inf") for t in EOS} if p.ignore_eos else {})}
    for token, value in bias.items():  # logit_bias
        x[token] += value
    window = history[-PENALTY_LAST_N:]
    if window and (p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty):  # penalties
        ids, counts = torch.tensor(window).unique(return_counts=True)
        seen = x[ids]
        seen = torch.where(seen > 0, seen / p.repeat_penalty, seen * p.repeat_penalty)
        x[ids] = seen - counts.double() * p.frequency_penalty - p.presence_penalty
    if allowed is not None:  # constraint
        x[~torch.from_numpy(allowed)] = float("-inf")
    if p.temperature <= 0 or p.top_k == 1:
        return int(torch.argmax(x)), None
    if 0 < p.top_k < V:  # top_k
        x[x < torch.topk(x, p.top_k).values[-1]] = float("-inf")
    probs = torch.softmax(x, -1)
    if p.top_p < 1.0:  # top_p: the smallest set of best tokens whose mass reaches top_p
        sorted_probs, order = torch.sort(probs, descending=True)
        x[order[(torch.cumsum(sorted_probs, 0) - sorted_probs) >= p.top_p]] = float("-inf")
    if p.min_p > 0.0:  # min_p: relative to the best token, so the same before or after top_p renormalizes
        x[probs < p.min_p * probs.max()] = float("-inf")
    return None, torch.softmax(x / p.temperature, -1).numpy()  # temperature


SETTINGS = list(itertools.product(
    [0.0, 0.7, 1.5],  # temperature
    [0, 1, 40],  # top_k
    [1.0, 0.9, 0.5],  # top_p
    [0.0, 0.05],  # min_p
    [(1.0, 0.0, 0.0), (1.3, 0.3, 0.5)],  # repeat, frequency, presence penalties
    [{}, {3: 4.0, 10: -2.5, 42: 1.5}],  # logit_bias
    [False, True],  # ignore_eos
))


def test_numpy_sampler_matches_the_torch_reference_on_every_combination():
    pytest.importorskip("torch")
    for i, (temp, top_k, top_p, min_p, (rp, fp, pp), bias, ignore_eos) in enumerate(SETTINGS):
        params = GenerateParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=rp,
                                frequency_penalty=fp, presence_penalty=pp, logit_bias=bias, ignore_eos=ignore_eos)
        logits, history = _logits(i), _history(i)
        allowed = np.random.default_rng(i).random(V) < 0.7 if i % 3 == 0 else None  # a constraint's mask
        greedy, reference = _torch_reference(logits, params, history, allowed)
        sampler = Sampler(params, V, EOS, history)
        if greedy is not None:
            assert sampler(logits, allowed) == greedy, (i, params)
            continue
        ids, probs = sampler.distribution(sampler.scores(logits, allowed))
        ours = _full(ids, probs)
        assert np.array_equal(ours > 0, reference > 0), (i, params)  # the same tokens survive the filters
        np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-15, err_msg=str(params))


def test_torch_logits_and_numpy_logits_give_the_same_tokens():
    """hf_transformers hands over its float32 CPU logits as a numpy view; onnx_runtime a float32 array."""
    torch = pytest.importorskip("torch")
    params = GenerateParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02, repeat_penalty=1.2, seed=11,
                            logit_bias={5: 3.0})
    hf, onnx = Sampler(params, V, EOS, _history(0)), Sampler(params, V, EOS, _history(0))
    for step in range(30):
        row = _logits(100 + step)
        a, b = hf(torch.from_numpy(row.copy()).numpy()), onnx(row)
        assert a == b
        hf.accept(a), onnx.accept(b)


def test_logit_bias_comes_before_the_penalties():
    """llama.cpp's order: the bias is added, then a repeated token's logit is divided (positive) or
    multiplied (negative) by repeat_penalty; the other way round picks a different token here."""
    assert STAGES[:3] == ("logit_bias", "penalties", "constraint")
    assert STAGES.index("top_k") < STAGES.index("top_p") < STAGES.index("min_p") < STAGES.index("temperature")
    logits = np.zeros(V, dtype=np.float32)
    logits[[1, 2]] = [1.0, 1.2]  # token 1 was seen; token 2 was not
    params = GenerateParams(temperature=0.0, repeat_penalty=2.0, logit_bias={1: 1.0})
    # bias first: (1.0 + 1.0) / 2 = 1.0 < 1.2; penalty first it would be 1.0 / 2 + 1.0 = 1.5 > 1.2
    assert Sampler(params, V, EOS, [1])(logits) == 2
    logits[[1, 2]] = [-1.0, 0.2]  # negative logit: bias first (-1 + 2) / 2 = 0.5 > 0.2; penalty first -2 + 2 = 0
    assert Sampler(GenerateParams(temperature=0.0, repeat_penalty=2.0, logit_bias={1: 2.0}), V, EOS, [1])(logits) == 1


def test_greedy_is_the_argmax_after_bias_penalties_and_constraint():
    logits = _logits(3)
    best = int(np.argmax(logits))
    assert Sampler(GenerateParams(temperature=0.0), V, EOS)(logits) == best
    assert Sampler(GenerateParams(temperature=0.7, top_k=1, seed=1), V, EOS)(logits) == best  # top_k 1 is greedy
    second = int(np.argsort(-logits)[1])
    assert Sampler(GenerateParams(temperature=0.0, logit_bias={best: -100.0}), V, EOS)(logits) == second
    assert Sampler(GenerateParams(temperature=0.0, presence_penalty=100.0), V, EOS, [best])(logits) == second
    allowed = np.ones(V, dtype=bool)
    allowed[best] = False
    assert Sampler(GenerateParams(temperature=0.0), V, EOS)(logits, allowed) == second
    logits[EOS[0]] = 100.0
    assert Sampler(GenerateParams(temperature=0.0), V, EOS)(logits) == EOS[0]
    assert Sampler(GenerateParams(temperature=0.0, ignore_eos=True), V, EOS)(logits) == best


def test_penalties_look_at_the_last_64_tokens_only():
    logits = _logits(4)
    best = int(np.argmax(logits))
    other = (best + 1) % V
    params = GenerateParams(temperature=0.0, presence_penalty=100.0)
    assert Sampler(params, V, EOS, [best] + [other] * PENALTY_LAST_N)(logits) == best  # out of the window
    sampler = Sampler(params, V, EOS, [other] * (PENALTY_LAST_N - 1))
    sampler.accept(best)  # accepted tokens join the window
    assert sampler(logits) != best


def test_same_seed_same_tokens_other_seed_other_tokens():
    def run(seed):
        sampler = Sampler(GenerateParams(temperature=1.0, top_p=0.95, seed=seed), V, EOS, [1, 2, 3])
        tokens = []
        for step in range(40):
            tokens.append(sampler(_logits(step)))
            sampler.accept(tokens[-1])
        return tokens

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_logit_bias_outside_the_vocabulary_is_refused():
    for bad in (V, -1):
        with pytest.raises(InvalidInput) as raised:
            Sampler(GenerateParams(logit_bias={1: 1.0, bad: 2.0}), V, EOS)
        assert raised.value.hint == HINT_LOGIT_BIAS
        assert raised.value.message == f"logit_bias token {bad} is outside the vocabulary (0..{V - 1})."
