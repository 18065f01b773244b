"""GGUF models through llama-cpp-python: the default backend."""
from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from adapters.base import Adapter, Capability, Delta, GenerateParams, Usage
from adapters.text import StopBuffer, Utf8Stream
from server.errors import ContextLengthExceeded, InvalidRequestError, ModelLoadError

__all__ = ["LlamaCppAdapter", "open_llama", "plain_cpu_buffers"]

log = logging.getLogger("omniloader.llama_cpp")

DEFAULT_CONTEXT = 4096


@contextmanager
def plain_cpu_buffers():
    """Construct Llama models without llama.cpp's extra CPU buffer types (AMX, repacking).
    A native build on a CPU that advertises AMX compiles AMX kernels in, and on VMs that do not
    enable the tile state they die with SIGILL on the first multi-token batch; plain CPU buffers
    work everywhere. llama-cpp-python has no keyword for it, so the default params are patched
    for the duration of the constructor (loads are serialized by the router)."""
    import llama_cpp.llama as llama_module

    lib = llama_module.llama_cpp
    original = lib.llama_model_default_params

    def defaults():
        params = original()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = defaults
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def open_llama(model_path: str, *, extra_buffer_types: bool = False, **kwargs):
    """`llama_cpp.Llama(...)`, safe on every CPU unless extra_buffer_types is asked for."""
    import llama_cpp

    if extra_buffer_types:
        return llama_cpp.Llama(model_path=model_path, **kwargs)
    with plain_cpu_buffers():
        return llama_cpp.Llama(model_path=model_path, **kwargs)


class LlamaCppAdapter(Adapter):
    backend = "llama_cpp"
    capabilities = frozenset({Capability.CHAT, Capability.COMPLETION})

    def __init__(self, record, threads: int | None = None) -> None:
        super().__init__(record)
        self.threads = self.manifest.params.get("threads") or threads or os.cpu_count() or 1
        self._llm = None
        self._chat_formatter = None
        self._eog_ids = None
        self._pieces: dict[int, bytes] = {}

    def load(self) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = self.record.source_path()
        if not path.is_file():
            raise ModelLoadError(f"Model `{self.id}`: weights file not found at {path}.")
        params = self.manifest.params
        try:
            self._llm = open_llama(
                str(path),
                extra_buffer_types=bool(params.get("extra_buffer_types", False)),
                n_ctx=self.manifest.context_length or DEFAULT_CONTEXT,
                n_threads=self.threads,
                n_threads_batch=params.get("threads_batch") or self.threads,
                n_batch=params.get("n_batch", 512),
                n_gpu_layers=params.get("n_gpu_layers", 0),
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"Model `{self.id}` failed to load from {path}: {exc}") from exc
        template = self._llm.metadata.get("tokenizer.chat_template")
        if template:
            model = self._llm._model
            eos, bos = self._llm.token_eos(), self._llm.token_bos()
            self._chat_formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
            )

    def unload(self) -> None:
        if self._llm is not None:
            self._llm.close()
        self._llm = None

    def context_length(self) -> int:
        return self._llm.n_ctx()

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids: list[int]) -> str:
        return self._llm.detokenize(ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text for a conversation, through the GGUF's own chat template."""
        if self._chat_formatter is None:
            raise InvalidRequestError(f"Model `{self.id}` has no chat template; use /v1/completions.",
                                      param="model")
        return self._chat_formatter(messages=messages).prompt

    def prompt_tokens(self, params: GenerateParams) -> list[int]:
        if params.messages is not None:
            return self.tokenize(self.render_chat(params.messages), special=True)
        add_bos = self._llm._model.add_bos_token()
        return self._llm.tokenize((params.prompt or "").encode("utf-8"), add_bos=add_bos, special=True)

    def generate(self, params: GenerateParams, cancel: threading.Event) -> Iterator[Delta]:
        import llama_cpp

        prompt = self.prompt_tokens(params)
        max_new = self._check_context(len(prompt), params.max_tokens,
                                      "messages" if params.messages is not None else "prompt")
        llm = self._llm
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
            logits_processor=self._ban_eog() if params.ignore_eos else None,
        )
        utf8, stops = Utf8Stream(), StopBuffer(params.stop)
        produced, finish, stopped = 0, "length", False
        vocab = llm._model.vocab
        try:
            for token in tokens:
                if cancel.is_set():
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                produced += 1
                text, stopped = stops.push(utf8.push(self._piece(token)))
                if text:
                    yield Delta(text=text)
                if stopped:
                    finish = "stop"
                    break
                if produced >= max_new:
                    break
        finally:
            tokens.close()
        tail = ""
        if not stopped:  # the last bytes may still complete a stop string
            tail, stopped = stops.push(utf8.flush())
            tail, finish = (tail, "stop") if stopped else (tail + stops.flush(), finish)
        yield Delta(text=tail, finish_reason=finish, usage=Usage(len(prompt), produced))

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

    def _ban_eog(self):
        """A logits processor that makes end-of-generation tokens impossible (ignore_eos)."""
        import llama_cpp
        import numpy as np

        if self._eog_ids is None:
            vocab = self._llm._model.vocab
            self._eog_ids = np.array([t for t in range(self._llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)],
                                     dtype=np.intc)
        eog = self._eog_ids

        def ban(_input_ids, scores):
            scores[eog] = -np.inf
            return scores

        return llama_cpp.LogitsProcessorList([ban])

    def _check_context(self, n_prompt: int, max_tokens: int | None, param: str) -> int:
        """How many tokens may be generated; a request that cannot fit is refused, never truncated."""
        n_ctx = self._llm.n_ctx()
        if n_prompt >= n_ctx or (max_tokens is not None and n_prompt + max_tokens > n_ctx):
            wanted = n_prompt + (max_tokens or 0)
            raise ContextLengthExceeded(
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{wanted} tokens ({n_prompt} in the messages, {max_tokens or 0} in the completion). "
                "Please reduce the length of the messages or completion.",
                param=param,
            )
        return max_tokens if max_tokens is not None else n_ctx - n_prompt

    def memory_estimate(self) -> int:
        try:
            return self.record.source_path().stat().st_size
        except OSError:
            return 0
