"""GGUF models through llama-cpp-python: the default backend."""
from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from adapters.base import (
    Adapter,
    Capability,
    Delta,
    GenerateParams,
    TokenLogprob,
)
from adapters.errors import (
    HINT_INPUT,
    HINT_LOGIT_BIAS,
    HINT_MODEL,
    HINT_SCHEMA,
    HINT_SUFFIX,
    HINT_TOKENS,
    ContextTooLong,
    InvalidInput,
    LoadFailed,
    Unsupported,
)
from adapters.llama_prompt_cache import PromptCache
from adapters.llama_grammar import json_schema_grammar, lazy_grammar_llama
from adapters.llama_overlay import DEFAULT_CACHE, LlamaOverlays
from adapters.logprobs import token_logprob
from adapters.text import DeltaEmitter
from adapters.tokens import check_token_ids
from adapters.machine import physical_cores
from adapters.gguf import gguf_footprint
from adapters.global_state import PATCH_LOCK

__all__ = ["LlamaCppAdapter", "open_llama", "model_params", "plain_cpu_buffers"]

log = logging.getLogger("omniloader.llama_cpp")

DEFAULT_CONTEXT = 4096


@contextmanager
def model_params(*, extra_buffer_types: bool = False, progress: Callable[[float], None] | None = None):
    """Adjust the llama.cpp model params that llama-cpp-python's constructor has no keyword for;
    the default params are patched for the constructor's duration, under PATCH_LOCK.

    - extra buffer types (AMX, repacking) are off unless asked for: a native build on a CPU that
      advertises AMX compiles AMX kernels in, and on VMs that do not enable the tile state they
      die with SIGILL on the first multi-token batch; plain CPU buffers work everywhere.
    - progress(fraction) is called while the weights load."""
    import llama_cpp.llama as llama_module

    lib = llama_module.llama_cpp
    original = lib.llama_model_default_params
    callback = None if progress is None else lib.llama_progress_callback(lambda f, _data: progress(f) or True)

    def defaults():
        params = original()
        params.use_extra_bufts = extra_buffer_types
        if callback is not None:
            params.progress_callback = callback
        return params

    with PATCH_LOCK:
        lib.llama_model_default_params = defaults
        try:
            yield
        finally:
            lib.llama_model_default_params = original


def plain_cpu_buffers():
    """model_params() with its safe defaults (for raw llama_cpp.Llama users: tests, benchmarks)."""
    return model_params()


def open_llama(model_path: str, *, extra_buffer_types: bool = False,
               progress: Callable[[float], None] | None = None, cls: type | None = None, **kwargs):
    """`llama_cpp.Llama(...)` (or `cls(...)`, a subclass), safe on every CPU unless extra_buffer_types is asked for."""
    import llama_cpp

    with model_params(extra_buffer_types=extra_buffer_types, progress=progress):
        return (cls or llama_cpp.Llama)(model_path=model_path, **kwargs)


class LlamaCppAdapter(Adapter):
    backend = "llama_cpp"
    supported = frozenset({Capability.CHAT, Capability.COMPLETION, Capability.TOOLS, Capability.JSON_SCHEMA,
                              Capability.LOGPROBS, Capability.EMBEDDINGS})

    def __init__(self, record, settings=None) -> None:
        super().__init__(record, settings)
        self.threads = self.manifest.params.get("threads") or getattr(settings, "threads", None) or physical_cores()
        self._llm = None
        self._embedder = None
        self._chat_formatter = None
        self._eog_ids: list[int] | None = None
        self._pieces: dict[int, bytes] = {}
        self._grammars: dict[str, object] = {}
        self._overlays: LlamaOverlays | None = None  # LoRA adapters / control vector per request
        self._kv_overlay: str | None = None  # the overlay key the prompt KV cache was computed with

    def load(self, progress: Callable[[float], None] | None = None) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = self.record.source_path()
        if not path.is_file():
            raise LoadFailed(f"Model `{self.id}`: weights file not found at {path}.")
        params = self.manifest.params
        try:
            self._llm = open_llama(
                str(path),
                extra_buffer_types=bool(params.get("extra_buffer_types", False)),
                progress=progress,
                cls=lazy_grammar_llama(),  # JSON schema / tool grammars checked one token at a time
                n_ctx=self.manifest.context_length or DEFAULT_CONTEXT,
                n_threads=self.threads,
                n_threads_batch=params.get("threads_batch") or self.threads,
                n_batch=params.get("n_batch", 512),
                n_gpu_layers=params.get("n_gpu_layers", 0),
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise LoadFailed(f"Model `{self.id}` failed to load from {path}: {exc}") from exc
        template = self._llm.metadata.get("tokenizer.chat_template")
        if template:
            model = self._llm._model
            eos, bos = self._llm.token_eos(), self._llm.token_bos()
            self._chat_formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
            )
        cache = self.manifest.params.get("aura_cache") or getattr(self.settings, "aura_cache", None) or DEFAULT_CACHE
        self._overlays = LlamaOverlays(self._llm, self.id, cache)
        self._cache = PromptCache(self._llm)
        self.report_capabilities(self.supported)

    def unload(self) -> None:
        if self._overlays is not None:
            self._overlays.close()  # adapters are freed before the model they belong to
            self._overlays = None
        for llm in (self._llm, self._embedder):
            if llm is not None:
                llm.close()
        self._llm = self._embedder = None
        self.capabilities = frozenset()

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalized hidden states from a second context in embedding mode
        (created on first use: generation contexts cannot pool)."""
        import llama_cpp

        if self._embedder is None:
            self._embedder = open_llama(
                str(self.record.source_path()), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                n_ctx=self._llm.n_ctx(), n_batch=self._llm.n_ctx(), n_ubatch=self._llm.n_ctx(),
                n_threads=self.threads, n_threads_batch=self.threads, verbose=False)
        for i, text in enumerate(texts):
            n = len(self.tokenize(text, special=False))
            if n > self._embedder.n_ctx():
                raise ContextTooLong(f"Input {i} has {n} tokens; this model embeds at most "
                                            f"{self._embedder.n_ctx()}.", hint=HINT_INPUT)
        vectors, count = self._embedder.embed(texts, normalize=True, truncate=False, return_count=True)
        return vectors, count

    def context_length(self) -> int:
        return self._llm.n_ctx()

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids: list[int]) -> str:
        check_token_ids(ids, self._llm.n_vocab(), HINT_TOKENS)  # llama.cpp reads out of bounds on unknown ids
        return self._llm.detokenize(ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text for a conversation, through the GGUF's own chat template."""
        if self._chat_formatter is None:
            raise InvalidInput(f"Model `{self.id}` has no chat template; use /v1/completions.",
                                      hint=HINT_MODEL)
        return self._chat_formatter(messages=messages).prompt

    def prompt_tokens(self, params: GenerateParams) -> list[int]:
        if params.messages is not None:
            return self.tokenize(self.render_chat(params.messages), special=True)
        add_bos = self._llm._model.add_bos_token()
        bos = [self._llm.token_bos()] if add_bos else []
        if params.suffix is not None:
            return bos + self._infill_tokens(params.prompt or "", params.suffix)
        return bos + self.tokenize(params.prompt or "", special=True)

    def _infill_tokens(self, prefix: str, suffix: str) -> list[int]:
        import llama_cpp

        vocab = self._llm._model.vocab
        pre, suf, mid = (llama_cpp.llama_vocab_fim_pre(vocab), llama_cpp.llama_vocab_fim_suf(vocab),
                         llama_cpp.llama_vocab_fim_mid(vocab))
        if min(pre, suf, mid) < 0:
            raise Unsupported(f"Model `{self.id}` has no fill-in-the-middle tokens, so `suffix` "
                                         "(infill) is not supported.", hint=HINT_SUFFIX)
        return [pre, *self.tokenize(prefix, special=False), suf, *self.tokenize(suffix, special=False), mid]

    def generate(self, params: GenerateParams, cancel: threading.Event) -> Iterator[Delta]:
        import llama_cpp

        prompt = self.prompt_tokens(params)
        max_new = self.generation_budget(len(prompt), params.max_tokens)
        grammar = self._grammar(params.json_schema) if params.json_schema is not None else None
        llm = self._llm
        self._use_overlay(params.overlay)
        self._cache.prefill(prompt)
        llm.set_seed(params.seed if params.seed is not None else random.getrandbits(32))
        tokens = llm.generate(
            prompt,
            temp=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            logits_processor=self._logits_processor(params),
            grammar=grammar,
        )
        want_logprobs = params.logprobs or params.top_logprobs > 0
        emit, finish = DeltaEmitter(params.stop), "length"
        vocab = llm._model.vocab
        try:
            for token in tokens:
                if cancel.is_set():
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                logprob = self._sampled_logprob(token, params.top_logprobs) if want_logprobs else None
                if delta := emit.push(self._piece(token), logprob):
                    yield delta
                if emit.stopped or emit.produced >= max_new:
                    break
        finally:
            tokens.close()
        yield emit.finish(finish, len(prompt))

    def _use_overlay(self, overlay) -> None:
        """Set the request's LoRA adapters and control vector (none: the base model) on the context.
        The prompt KV cache is kept only for the overlay it was computed with (keys compare content)."""
        key = overlay.key if overlay is not None and not overlay.empty else None
        self._overlays.apply(overlay)
        if key != self._kv_overlay:
            self._cache.reset()  # nothing cached is reused: the next prompt is evaluated from scratch
            self._kv_overlay = key

    def overlay_cache_size(self) -> int:
        """Loaded LoRA adapters (at most the `aura_cache` setting, plus those one request stacks)."""
        return self._overlays.cached() if self._overlays is not None else 0

    def _sampled_logprob(self, token: int, top: int) -> TokenLogprob:
        """Log-probability of the token just sampled, from the raw logits it was sampled from
        (before bias, penalties or grammar: the model's own distribution)."""
        import numpy as np

        logits = np.ctypeslib.as_array(self._llm._ctx.get_logits_ith(-1), shape=(self._llm.n_vocab(),))
        return token_logprob(logits, token, top, self._piece)

    def score_prompt(self, prompt: str, top: int) -> list[TokenLogprob]:
        import numpy as np

        llm = self._llm
        tokens = self.prompt_tokens(GenerateParams(prompt=prompt))
        self.generation_budget(len(tokens), 0)
        self._use_overlay(None)  # the base model scores (a request's overlay never lingers here)
        self._cache.reset()  # the KV cache is rebuilt here; the next generate() evaluates from scratch
        llm._ctx.kv_cache_clear()
        first = self._piece(tokens[0]) if tokens else b""
        scored = [TokenLogprob(first.decode("utf-8", errors="replace"), None, list(first))]
        n_batch, n_vocab = llm.n_batch, llm.n_vocab()
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start:start + n_batch]
            llm._batch.set_batch(chunk, n_past=start, logits_all=True)
            llm._ctx.decode(llm._batch)
            for i in range(len(chunk)):
                if start + i + 1 < len(tokens):
                    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(i), shape=(n_vocab,))
                    scored.append(token_logprob(logits, tokens[start + i + 1], top, self._piece))
        llm._ctx.kv_cache_clear()
        return scored[: len(tokens)]

    def _grammar(self, schema: dict):
        """A GBNF grammar for the JSON schema, compiled once per distinct schema."""
        key = json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            try:
                grammar = json_schema_grammar(schema)
            except Exception as exc:  # the converter raises plain errors for schemas it cannot express
                raise InvalidInput(f"Invalid or unsupported JSON schema: {exc}",
                                          hint=HINT_SCHEMA) from None
            self._grammars[key] = grammar
        return grammar

    def _logits_processor(self, params: GenerateParams):
        """logit_bias and ignore_eos as one llama.cpp logits processor (None when neither is asked)."""
        import llama_cpp
        import numpy as np

        bias = dict(params.logit_bias)
        check_token_ids(bias, self._llm.n_vocab(), HINT_LOGIT_BIAS)
        if params.ignore_eos:
            bias.update({t: -np.inf for t in self._eog_tokens()})
        if not bias:
            return None
        ids = np.fromiter(bias.keys(), dtype=np.intc)
        values = np.fromiter(bias.values(), dtype=np.float32)

        def apply(_input_ids, scores):
            scores[ids] += values
            return scores

        return llama_cpp.LogitsProcessorList([apply])

    def _eog_tokens(self) -> list[int]:
        import llama_cpp

        if self._eog_ids is None:
            vocab = self._llm._model.vocab
            self._eog_ids = [t for t in range(self._llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        return self._eog_ids

    def _piece(self, token: int) -> bytes:
        """The token's bytes (cached: the vocabulary never changes while loaded)."""
        piece = self._pieces.get(token)
        if piece is None:
            import ctypes

            import llama_cpp

            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._llm._model.vocab, token, buf, len(buf), 0, False)
            if n < 0:  # longer than the buffer: -n is the size it needs
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._llm._model.vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def memory_estimate(self) -> int:
        try:
            return gguf_footprint(self.record.source_path(), self.manifest.context_length or DEFAULT_CONTEXT,
                                  self.manifest.params.get("n_batch", 512))
        except OSError:  # missing file: the load says so
            return 0
