"""The request bodies of POST /lab/train/target (one correction) and POST /lab/train/live (every queued
correction of a model), minus `model`, decoded by the server with msgspec. Every field has a bound (a value
out of bounds is a 400 naming the field); the engines check again what msgspec does not (a spec built in
Python, cross-field rules such as "`prompt` or `messages`"). No torch here: the working-memory estimate
(lab_engines.working_memory) reads these too.

Defaults were measured on the default model (SmolLM2-135M-Instruct, float32 on CPU); README.md's Lab
section quotes the numbers."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from lab_engines.limits import MAX_ITEMS, Seed, ShortText, Text

__all__ = ["AUTO_ORDER", "LIVE_AUTO_ORDER", "LIVE_METHODS", "METHODS", "Correction", "Message", "Neighbor",
           "TeachKnobs", "TrainLiveSpec", "TrainTargetSpec"]

METHODS = ("token_bias", "prompt", "rome", "lora", "dpo", "steer", "auto")
LIVE_METHODS = ("token_bias", "prompt", "lora", "dpo", "auto")
AUTO_ORDER = ("token_bias", "prompt", "rome", "lora", "dpo")  # cheapest first
LIVE_AUTO_ORDER = ("token_bias", "prompt", "lora", "dpo")
MAX_LAYER = 4095  # the model's own range is checked when the job runs
MAX_MESSAGES = 64
MAX_CORRECTIONS = 256

Layer = Annotated[int, msgspec.Meta(ge=0, le=MAX_LAYER)]
Role = Literal["system", "user", "assistant"]
LoraModule = Literal["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # = adapters.overlay.LORA_MODULES
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^([0-9a-f]{64})?$")]


class Message(msgspec.Struct, kw_only=True):
    role: Role
    content: Text


Messages = Annotated[list[Message], msgspec.Meta(max_length=MAX_MESSAGES)]


class Neighbor(msgspec.Struct, kw_only=True):
    """A prompt whose answer must not change: `answer` (a continuation, with its leading space), or None for
    the model's own greedy answer before the run (`answer_tokens` tokens)."""

    prompt: Text
    answer: ShortText | None = None


class Correction(msgspec.Struct, kw_only=True):
    """One queued correction (train_live): `prompt` or `messages`, the `good` answer, optionally the `bad` one."""

    prompt: Text = ""
    messages: Messages | None = None
    good: ShortText = ""
    bad: ShortText | None = None


class TeachKnobs(msgspec.Struct, kw_only=True):
    """What both teach kinds share: method knobs, the distance gates, the evaluation and the revert rule."""

    seed: Seed = 0
    # --- token_bias: the smallest positive biases (OpenAI logit_bias, ±100) that make greedy produce the target,
    # each with this much headroom over the best competing logit (engines other than torch round differently)
    bias_margin: Annotated[float, msgspec.Meta(ge=0.0, le=20.0)] = 1.0
    # --- rome / steer: the layer (rome: its mlp.down_proj; steer: the residual after it, >= 1). None: rome picks
    # it by causal tracing, steer takes n_layers // 2
    layer: Layer | None = None
    rome_steps: Annotated[int, msgspec.Meta(ge=1, le=500)] = 30  # Adam steps optimising v*
    rome_lr: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] = 0.5  # ROME (GPT-2 XL): 0.5
    kl_factor: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.0625  # ROME: 0.0625 ("{subject} is a")
    rome_weight_decay: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 0.5  # on ||δ||² / ||v||², ROME: 0.5
    clamp_norm_factor: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 4.0  # ||δ|| <= this × ||W k*||, ROME: 4
    # --- lora / dpo
    rank: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    alpha: Annotated[float, msgspec.Meta(gt=0.0, le=4096.0)] = 4.0
    steps: Annotated[int, msgspec.Meta(ge=1, le=2000)] = 40
    lr: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 2e-4
    modules: Annotated[list[LoraModule], msgspec.Meta(min_length=1, max_length=7)] = msgspec.field(
        default_factory=lambda: ["mlp.down_proj", "mlp.up_proj"])
    layers: Annotated[list[Layer], msgspec.Meta(min_length=1, max_length=MAX_LAYER + 1)] | None = None  # None: all
    beta: Annotated[float, msgspec.Meta(gt=0.0, le=100.0)] = 0.1  # DPO's β
    # --- steer: None tries 0.125, 0.25, ..., 4 and keeps the first that makes greedy answer the target
    coefficient: Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)] | None = None
    # --- distance gates (on by default)
    grad_clip: Annotated[float, msgspec.Meta(gt=0.0, le=1000.0)] = 1.0  # max global gradient norm a step
    # max ||ΔW||_F / ||W||_F of any edited matrix; a bigger change is scaled down to it
    max_delta_norm: Annotated[float, msgspec.Meta(gt=0.0, le=10.0)] = 0.1
    # --- evaluation and the automatic revert
    answer_tokens: Annotated[int, msgspec.Meta(ge=1, le=64)] | None = None  # None: the target's token count
    fluency_tokens: Annotated[int, msgspec.Meta(ge=0, le=256)] = 16  # greedy tokens a fluency sample
    regression_set: Literal["shipped", "none"] = "shipped"  # lab_engines/probes/regression.jsonl
    regression_extra: Annotated[list[Neighbor], msgspec.Meta(max_length=MAX_ITEMS)] = msgspec.field(
        default_factory=list)
    # revert when more than this fraction of the regression items the model got right before the run break, or of
    # the neighbours it answered change their answer (auto: try the next method)
    regression_threshold: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.1
    base_sha256: Sha256 = ""  # filled in by the server: the base model's files (written into component metadata)


class TrainTargetSpec(TeachKnobs, kw_only=True):
    """POST /lab/train/target: one correction, `prompt` (raw text) or `messages` (chat, rendered with the
    model's chat template and its generation prompt), and the `target` answer."""

    prompt: Text = ""
    messages: Messages | None = None
    target: ShortText = ""
    method: Literal["token_bias", "prompt", "rome", "lora", "dpo", "steer", "auto"] = "auto"
    rejected: ShortText | None = None  # the bad answer; None: the model's own greedy answer
    # paraphrases and neighbours replace the question: the raw prompt, or the last user message of `messages`
    paraphrases: Annotated[list[Text], msgspec.Meta(max_length=MAX_ITEMS)] = msgspec.field(default_factory=list)
    neighbors: Annotated[list[Neighbor], msgspec.Meta(max_length=MAX_ITEMS)] = msgspec.field(default_factory=list)
    subject: ShortText | None = None  # rome: the subject in the prompt; None: picked by causal tracing
    # auto: the methods tried, in this order (default AUTO_ORDER)
    auto_methods: Annotated[list[Literal["token_bias", "prompt", "rome", "lora", "dpo"]],
                            msgspec.Meta(min_length=1, max_length=5)] | None = None


class TrainLiveSpec(TeachKnobs, kw_only=True):
    """POST /lab/train/live: every queued correction of the model (the server fills `corrections` from the
    queue), trained together."""

    corrections: Annotated[list[Correction], msgspec.Meta(max_length=MAX_CORRECTIONS)] = msgspec.field(
        default_factory=list)
    method: Literal["token_bias", "prompt", "lora", "dpo", "auto"] = "auto"
    # rendered in the first correction's form (its chat messages with the question replaced, or raw text)
    neighbors: Annotated[list[Neighbor], msgspec.Meta(max_length=MAX_ITEMS)] = msgspec.field(default_factory=list)
    auto_methods: Annotated[list[Literal["token_bias", "prompt", "lora", "dpo"]],
                            msgspec.Meta(min_length=1, max_length=4)] | None = None
