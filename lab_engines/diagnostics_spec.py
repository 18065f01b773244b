"""The request body of POST /lab/diagnostics/run (minus `model`), decoded by the server with msgspec, and
the sizes the diagnostics engine (lab_engines.diagnostics) works in. No torch here: the working-memory
estimate (lab_engines.working_memory) reads these too."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from lab_engines.limits import Seed, ShortText, Text, Texts

__all__ = ["CHUNK", "LIMITS", "PRESETS", "ROLES", "SECTIONS", "TOKEN_BUDGET", "DiagnosticsSpec", "ProbeItem"]

SECTIONS = ("heads", "spectra", "probes", "memorization")
ROLES = ("previous_token", "duplicate_token", "induction")
PRESETS = {  # default model on 2 shared CPU cores: quick ~25-45 s in all, full ~3.5 min (1000 controls)
    "quick": {"n_sequences": 4, "repeat_len": 50, "n_controls": 100},
    "full": {"n_sequences": 16, "repeat_len": 100, "n_controls": 1000},
}
LIMITS = {"n_sequences": (1, 256), "repeat_len": (2, 4096), "n_controls": (1, 10000)}
NSequences = Annotated[int, msgspec.Meta(ge=1, le=256)]  # = LIMITS, checked again for specs built in Python
RepeatLen = Annotated[int, msgspec.Meta(ge=2, le=4096)]
NControls = Annotated[int, msgspec.Meta(ge=1, le=10000)]
ProbeSetName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_]{1,64}$")]  # a file stem in PROBE_DIR
CHUNK = 4  # sequences per forward pass with attentions (bounds the [L, B, H, S, S] tensor)
TOKEN_BUDGET = 1024  # padded tokens per forward pass when scoring text (logits: 1024 x vocab floats)


class ProbeItem(msgspec.Struct, kw_only=True):
    """One probe: the model should prefer `correct` (a continuation of prompt, with its leading space)
    over every one of `incorrect`."""

    prompt: Text
    correct: ShortText
    incorrect: Annotated[list[ShortText], msgspec.Meta(min_length=1, max_length=16)]


class DiagnosticsSpec(msgspec.Struct, kw_only=True):
    """The body of POST /lab/diagnostics/run (minus `model`). None means "the mode's preset" (PRESETS) or
    "the built-in default"."""

    mode: Literal["quick", "full"] = "quick"
    sections: Annotated[list[Literal["heads", "spectra", "probes", "memorization"]], msgspec.Meta(max_length=4)] \
        = msgspec.field(default_factory=lambda: list(SECTIONS))
    seed: Seed = 0
    n_sequences: NSequences | None = None
    repeat_len: RepeatLen | None = None  # and 1 + 2 * repeat_len within the model's context
    # a head "is" a role when its score exceeds this (report only)
    role_threshold: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.3
    # |w| < eps counts as near zero (absolute, in the weight's own units)
    near_zero_eps: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1e-6
    # robust z-score (Iglewicz & Hoaglin) above which a matrix is flagged
    outlier_z: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 3.5
    probe_sets: Annotated[list[ProbeSetName], msgspec.Meta(max_length=16)] | None = None  # None: every shipped set
    # scored as the set "user"
    probes: Annotated[list[ProbeItem], msgspec.Meta(max_length=256)] = msgspec.field(default_factory=list)
    texts: Texts | None = None  # None: BUILTIN_TEXTS (one famous, one never written before)
    min_k_percent: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 20.0
    canaries: Annotated[list[ShortText], msgspec.Meta(max_length=16)] | None = None  # None: BUILTIN_CANARIES
    n_controls: NControls | None = None
