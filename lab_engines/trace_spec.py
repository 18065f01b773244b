"""The request body of POST /lab/trace (minus `model`), decoded by the server with msgspec, and the
sizes the trace engine (lab_engines.trace) works in. No torch here: the working-memory estimate
(lab_engines.working_memory) reads these too."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from lab_engines.limits import ShortText, Text

__all__ = ["BASELINES", "BATCH_TOKENS", "LIMITS", "MAX_TARGET_TOKENS", "METHODS", "TARGET_FNS", "TraceSpec"]

METHODS = ("grad_act", "integrated_gradients", "attention_rollout")
BASELINES = ("zero", "pad", "token", "input")
TARGET_FNS = ("logprob", "logit")
LIMITS = {"n_steps": (1, 4096), "batch_size": (1, 256), "max_target_tokens": (1, 64)}
MAX_TARGET_TOKENS = 64
BATCH_TOKENS = 4096  # path points x sequence length per IG pass (~1.5 MB of kept activations each on SmolLM2)


class TraceSpec(msgspec.Struct, kw_only=True):
    """The body of POST /lab/trace (minus `model`). Defaults: IG from a zero baseline with up to 512 gradient
    points (most prompts converge with 150-350), 32 per pass, attributing the log-prob of the greedy next token."""

    prompt: Text
    target: ShortText | None = None
    max_target_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TARGET_TOKENS)] = 1
    prefix: ShortText | None = None
    method: Literal["grad_act", "integrated_gradients", "attention_rollout"] = "integrated_gradients"
    target_fn: Literal["logprob", "logit"] = "logprob"
    n_steps: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 512
    tolerance: Annotated[float, msgspec.Meta(ge=0.0, lt=1.0)] = 0.02
    baseline: Literal["zero", "pad", "token", "input"] = "zero"
    baseline_token_id: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=256)] = 32
    plots: bool = True
