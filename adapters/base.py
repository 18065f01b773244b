"""The adapter contract: what every backend implements and the types it exchanges."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
from adapters.errors import HINT_ECHO, HINT_MODEL, HINT_PROMPT, ContextTooLong, Unsupported
from adapters.overlay import EngineOverlay


__all__ = ["Capability", "CAPABILITY_ORDER", "ordered", "GenerateParams", "Usage", "TopLogprob", "TokenLogprob",
           "ToolCallPiece", "Delta", "Adapter"]


class Capability:
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDINGS = "embeddings"
    TOOLS = "tools"
    JSON_SCHEMA = "json_schema"
    LOGPROBS = "logprobs"
    LORA = "lora"
    TORCH = "torch"
    INSERT = "insert"  # fill-in-the-middle: the tokenizer has FIM tokens (GenerateParams.suffix)
    THINKING = "thinking"  # the chat template thinks in <think>...</think> (split out as reasoning)


class GenerateParams(msgspec.Struct, kw_only=True):
    """One generation request, backend-neutral. Exactly one of messages / prompt is set."""

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    max_tokens: int | None = None  # None: until end of sequence or the context is full
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    stop: list[str] = []
    seed: int | None = None
    ignore_eos: bool = False  # keep generating past end-of-sequence (benchmarks, tests)
    logit_bias: dict[int, float] = {}  # token id -> added to its logit
    json_schema: dict[str, Any] | None = None  # constrain the output to JSON matching this schema
    logprobs: bool = False
    top_logprobs: int = 0
    suffix: str | None = None  # fill in the middle between prompt and suffix (completions)
    # LoRA deltas and steering vectors applied for this generation only (an aura's in-model part;
    # adapters/overlay.py). None: the base model as loaded.
    overlay: EngineOverlay | None = None
    # The decoded API request (ChatCompletionRequest / CompletionRequest) these params came from.
    # Only backends that forward requests to another server read it (vllm_remote: which fields the
    # client actually set, raw messages, tools, response_format); every other adapter ignores it.
    request: Any = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int


class TopLogprob(msgspec.Struct, array_like=True):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct):
    """One generated (or scored) token with its log-probability under the model (None for a
    prompt's first token, which has no context to be scored in)."""

    token: str
    logprob: float | None
    bytes: list[int]
    top: list[TopLogprob] = []


class ToolCallPiece(msgspec.Struct):
    """A tool call as a backend that runs tools itself streams it (Adapter.handles_tools): id and
    name on the first piece of a call, then argument fragments that join to a JSON string."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Delta(msgspec.Struct):
    """A piece of generated text; the last one of a sequence carries finish_reason and usage."""

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None  # the tokens behind this piece, when asked for
    tool_calls: list[ToolCallPiece] | None = None  # only from backends with handles_tools


CAPABILITY_ORDER = (Capability.CHAT, Capability.COMPLETION, Capability.TOOLS, Capability.JSON_SCHEMA,
                    Capability.LOGPROBS, Capability.EMBEDDINGS, Capability.INSERT, Capability.THINKING,
                    Capability.LORA, Capability.TORCH)


def ordered(capabilities) -> list[str]:
    """Capabilities in the order people read them (chat first), unknown ones last, by name."""
    rank = {c: i for i, c in enumerate(CAPABILITY_ORDER)}
    return sorted(capabilities, key=lambda c: (rank.get(c, len(rank)), c))


# Capabilities that say what the Lab and plugins may reach (not what a request may ask for): a
# manifest's list never switches them off.
ACCESS_CAPABILITIES = frozenset({Capability.TORCH, Capability.LORA})


class Adapter:
    """One loaded model of one backend. Methods run on the model's worker thread, never on the loop.

    Capabilities have one source per moment: before loading, `declared_capabilities(record)` (the
    registry, /api/models and selection use it); once loaded, the instance's `capabilities` (request
    checks use it), which the backend computes the same way from the files it actually loaded."""

    backend = "base"
    supported: frozenset[str] = frozenset()  # everything this backend can do for some model
    capabilities: frozenset[str] = frozenset()  # what this loaded model can do (set by load())
    # True for a backend that applies tools and response_format itself (a remote server): the
    # serving layer then neither prompts for tools nor parses calls, and streams Delta.tool_calls.
    handles_tools: bool = False

    def __init__(self, record, settings=None) -> None:
        self.record = record
        self.manifest = record.manifest
        self.settings = settings  # server Settings (threads, lab dir, ...) or None in tests

    @property
    def id(self) -> str:
        return self.record.id

    @classmethod
    def probe_capabilities(cls, record) -> frozenset[str]:
        """What a model of this backend can do, read from its files without loading weights
        (by default everything the backend supports)."""
        return cls.supported

    @classmethod
    def declared_capabilities(cls, record) -> list[str]:
        """Before loading: a curated or built-in manifest's list as its author wrote it; for a
        discovered model or a manifest that lists none, what the backend reads from the files."""
        if record.manifest.capabilities and record.origin != "discovered":
            return list(record.manifest.capabilities)
        return ordered(cls.probe_capabilities(record))

    def report_capabilities(self, found: set[str] | frozenset[str]) -> None:
        """After loading: what this model can do, within what its manifest's author declared."""
        listed = self.manifest.capabilities if self.record.origin != "discovered" else None
        found = frozenset(found)
        self.capabilities = found & (frozenset(listed) | ACCESS_CAPABILITIES) if listed else found

    def load(self, progress: Callable[[float], None] | None = None) -> None:
        """Load the model; call progress(fraction) as it goes when the backend can tell."""
        raise Unsupported(f"Backend `{self.backend}` cannot load models.")

    def unload(self) -> None:
        """Free the model's memory. Safe to call twice."""

    def context_length(self) -> int:
        raise Unsupported(f"Model `{self.id}` does not report a context length.")

    def generation_budget(self, n_prompt: int, max_tokens: int | None) -> int:
        """How many tokens may be generated; a request that cannot fit is refused, never truncated."""
        n_ctx = self.context_length()
        if n_prompt >= n_ctx or (max_tokens is not None and n_prompt + max_tokens > n_ctx):
            raise ContextTooLong(
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{n_prompt + (max_tokens or 0)} tokens ({n_prompt} in the messages, {max_tokens or 0} in the "
                "completion). Please reduce the length of the messages or completion.", hint=HINT_PROMPT)
        return max_tokens if max_tokens is not None else n_ctx - n_prompt

    def generate(self, params: GenerateParams, cancel: threading.Event) -> Iterator[Delta]:
        raise Unsupported(f"Model `{self.id}` cannot generate text.", hint=HINT_MODEL)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        raise Unsupported(f"Model `{self.id}` has no tokenizer.", hint=HINT_MODEL)

    def detokenize(self, ids: list[int]) -> str:
        raise Unsupported(f"Model `{self.id}` has no tokenizer.", hint=HINT_MODEL)

    def score_prompt(self, prompt: str, top: int) -> list[TokenLogprob]:
        """Log-probabilities of the prompt's own tokens."""
        raise Unsupported(f"Model `{self.id}` cannot score prompts (echo with logprobs).", hint=HINT_ECHO)

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Unit-length embedding vectors for the texts, and the number of tokens they took."""
        raise Unsupported(f"Model `{self.id}` does not support embeddings.", hint=HINT_MODEL)

    def memory_estimate(self) -> int:
        """Bytes this model will take once loaded (weights + caches), estimated before loading."""
        return 0
