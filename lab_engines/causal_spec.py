"""The request body of POST /lab/causal_test, decoded by the server with msgspec.convert.

One spec for the three interventions; each reads only its own fields (the others keep their
defaults and are ignored):
  patch   clean + corrupt  -> activation patching (TransformerLens conventions)
          clean + noise    -> ROME causal tracing (Meng et al. 2022)
  ablate  clean            -> zero / mean ablation of heads and MLPs
  steer   prompt + positive/negative -> contrastive activation addition (CAA / ActAdd)"""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from lab_engines.limits import ShortText, Seed, Text, Texts

__all__ = ["LOGIT_BUDGET", "MAX_BATCH", "MAX_SAMPLES", "CausalSpec", "NoiseSpec", "Site"]

Site = Literal["resid", "heads", "attn", "mlp"]
MAX_BATCH = 256  # rows per forward pass
MAX_SAMPLES = 256  # noise draws (ROME uses 10)
LOGIT_BUDGET = 1 << 27  # floats of full-sequence logits per pass when the loss needs them (~512 MB)
MAX_LAYER = 4095  # layer indices; the model's own range is checked when the job runs
Layer = Annotated[int, msgspec.Meta(ge=0, le=MAX_LAYER)]


class NoiseSpec(msgspec.Struct, kw_only=True):
    """Gaussian noise on the subject's token embeddings (seeded by CausalSpec.seed)."""

    subject: ShortText  # a substring of `clean`; its first occurrence is corrupted
    std: Annotated[float, msgspec.Meta(ge=0.0, le=1e4)] | None = None  # None: 3 × the embedding matrix's std
    samples: Annotated[int, msgspec.Meta(ge=1, le=MAX_SAMPLES)] = 10  # noise draws averaged over


class CausalSpec(msgspec.Struct, kw_only=True):
    model: ShortText | None = None  # which model; resolved by the server, unused by the engine
    intervention: Literal["patch", "ablate", "steer"] = "patch"
    seed: Seed = 0
    # rows per forward pass (speed vs memory; results do not depend on it)
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH)] = 16
    bos: bool = False  # prepend the tokenizer's BOS token to every prompt

    # patch / ablate
    clean: Text = ""
    corrupt: Text | None = None  # same token length as clean
    noise: NoiseSpec | None = None  # instead of corrupt: causal tracing
    answer: ShortText | None = None  # first token is used; None: the clean run's greedy top token
    corrupt_answer: ShortText | None = None  # None: corrupt run's top token (ablate: clean run's 2nd)
    metric: Literal["logit_diff", "logprob"] = "logit_diff"  # patch with corrupt; tracing uses prob
    # None: patch resid+heads, tracing resid+mlp+attn, ablate heads+mlp
    sites: Annotated[list[Site], msgspec.Meta(max_length=4)] | None = None
    layers: Annotated[list[Layer], msgspec.Meta(max_length=MAX_LAYER + 1)] | None = None  # to scan; None: all
    # tracing: mlp/attn restored over this many layers around each layer
    window: Annotated[int, msgspec.Meta(ge=1, le=MAX_LAYER + 1)] = 10
    ablation: Annotated[list[Literal["zero", "mean"]], msgspec.Meta(max_length=2)] = msgspec.field(
        default_factory=lambda: ["zero", "mean"])
    reference: Texts | None = None  # mean ablation: means over these texts, None: over clean

    # steer
    prompt: Text = ""  # empty: clean
    positive: Texts = msgspec.field(default_factory=list)
    negative: Texts = msgspec.field(default_factory=list)
    layer: Layer | None = None  # residual after this layer; None: n_layers // 2
    # SmolLM2-135M, layer 15, sentence pairs: 2 steers, 4+ breaks the text
    coefficient: Annotated[float, msgspec.Meta(ge=-1e4, le=1e4)] = 2.0
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=512)] = 20  # = causal_inputs.MAX_TOKENS
