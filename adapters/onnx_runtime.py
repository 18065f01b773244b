"""Decoder-only ONNX models with a KV cache through onnxruntime.

The folder layout is the one `omniloader models export-onnx` writes (and Optimum's text-generation
exports use): `model.onnx` (or `onnx/model.onnx`, `decoder_model_merged.onnx`) whose inputs are
`input_ids`, optionally `attention_mask` / `position_ids`, and `past_key_values.{i}.key|value`,
whose outputs are `logits` and `present.{i}.key|value`; the tokenizer files and config.json beside it.
"""
from __future__ import annotations

import gc
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters.base import Adapter, Capability, Delta, GenerateParams, TokenLogprob
from adapters.errors import (
    HINT_MODEL,
    HINT_PROMPT,
    HINT_SCHEMA,
    HINT_SUFFIX,
    HINT_TOKENS,
    InvalidInput,
    LoadFailed,
    Unsupported,
)
from adapters.hf_files import has_chat_template, read_json
from adapters.logprobs import token_logprob
from adapters.overlay import refuse_overlay
from adapters.text import DeltaEmitter
from adapters.tokens import byte_level_bytes, check_token_ids
from adapters.machine import physical_cores
from adapters.sampling import Sampler

__all__ = ["OnnxRuntimeAdapter", "Sampler", "find_onnx_file"]

log = logging.getLogger("omniloader.onnx_runtime")

DEFAULT_CONTEXT = 4096
PREFILL_CHUNK = 256  # prompt tokens per forward pass: bounds the [chunk, vocab] logits buffer
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_PRESENT = re.compile(r"^present\.(\d+)\.(key|value)$")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def find_onnx_file(source: Path, preferred: str | None = None) -> Path:
    """The decoder graph of a model folder (or the file itself)."""
    if source.is_file():
        return source
    names = [preferred] if preferred else ["model.onnx", "decoder_model_merged.onnx"]
    for folder in (source, source / "onnx"):
        for name in names:
            if (folder / name).is_file():
                return folder / name
    found = sorted(source.glob("*.onnx")) + sorted(source.glob("onnx/*.onnx"))
    if len(found) == 1 and not preferred:
        return found[0]
    listed = ", ".join(str(p.relative_to(source)) for p in found) or "none"
    raise LoadFailed(f"No decoder graph found in {source} (looked for {', '.join(names)}; .onnx files: "
                         f"{listed}). Name one with manifest `params: {{onnx_file: ...}}`.")


def _kv_dims(config: dict[str, Any]) -> tuple[int, int]:
    """(kv heads, head dim) from a config.json."""
    heads = config.get("num_attention_heads") or 1
    return config.get("num_key_value_heads") or heads, config.get("head_dim") or (config.get("hidden_size") or 0) // heads


@dataclass
class _Signature:
    """What the graph takes and gives, from the session's own metadata."""

    ids_dtype: type
    inputs: set[str]
    past: list[str]  # past_key_values.{i}.{key,value}, in graph input order
    present: dict[str, str]  # output name -> the past input it feeds next step
    past_shape: dict[str, tuple[int, int]]  # past name -> (kv heads, head dim)
    past_dtype: dict[str, type]
    outputs: list[str]


class OnnxRuntimeAdapter(Adapter):
    backend = "onnx_runtime"
    supported = frozenset({Capability.CHAT, Capability.COMPLETION, Capability.LOGPROBS})

    @classmethod
    def probe_capabilities(cls, record) -> frozenset[str]:
        """Chat when the folder's tokenizer has a chat template (what load() finds too)."""
        try:
            folder = record.source_path()
        except LoadFailed:
            return cls.supported
        folder = folder if folder.is_dir() else folder.parent
        return cls.supported if has_chat_template(folder) else cls.supported - {Capability.CHAT}

    def __init__(self, record, settings=None) -> None:
        super().__init__(record, settings)
        params = self.manifest.params
        self.threads = params.get("threads") or getattr(settings, "threads", None) or physical_cores()
        self.prefill_chunk = int(params.get("prefill_chunk", PREFILL_CHUNK))
        self._session = None
        self._tokenizer = None
        self._sig: _Signature | None = None
        try:
            self._config: dict[str, Any] = read_json(self._folder() / "config.json")
        except LoadFailed:  # an uninstalled package:// source: load() reports it
            self._config = {}
        self._eos: list[int] = []
        self._pieces: dict[int, bytes] = {}
        self._special: set[int] = set()
        self._bytes_of: Callable[[str], bytes | None] | None = None
        self._n_vocab = 0

    # --- loading ---------------------------------------------------------------------------
    def _folder(self) -> Path:
        path = self.record.source_path()
        return path.parent if path.is_file() else path

    def load(self, progress: Callable[[float], None] | None = None) -> None:
        import onnxruntime as ort

        source = self.record.source_path()
        if not source.exists():
            raise LoadFailed(f"Model `{self.id}`: no files at {source}.")
        onnx_file = find_onnx_file(source, self.manifest.params.get("onnx_file"))
        self._load_tokenizer()
        if progress:
            progress(0.2)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(self.threads)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # Idle worker threads sleep instead of spinning: other models and the event loop share the cores.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        providers = self.manifest.params.get("providers") or [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self._session = ort.InferenceSession(str(onnx_file), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise LoadFailed(f"Model `{self.id}` failed to load from {onnx_file}: {exc}") from exc
        self._sig = self._signature()
        log.info("%s: %s on %s, %d layers of KV cache", self.id, onnx_file.name,
                 self._session.get_providers()[0], len(self._sig.past) // 2)
        if progress:
            progress(1.0)

    def _load_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(self._folder()), local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, ... for a missing or bad tokenizer
            raise LoadFailed(f"Model `{self.id}`: no usable tokenizer in {self._folder()}: {exc}") from exc
        self._tokenizer = tok
        self._n_vocab = max(len(tok), int(self._config.get("vocab_size") or 0))
        self._special = set(tok.all_special_ids)
        self._eos = self._eos_ids(tok)
        decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
        if type(decoder).__name__ == "ByteLevel":
            added = {t.content for t in tok.added_tokens_decoder.values()}
            self._bytes_of = lambda s: None if s in added else byte_level_bytes(s)
        caps = {Capability.COMPLETION, Capability.LOGPROBS}
        if tok.chat_template:
            caps.add(Capability.CHAT)
        self.report_capabilities(caps)

    def _eos_ids(self, tok) -> list[int]:
        """Every id that ends a sequence: generation_config.json, config.json and the tokenizer's eos."""
        ids: set[int] = set()
        for source in (read_json(self._folder() / "generation_config.json").get("eos_token_id"),
                       self._config.get("eos_token_id"), tok.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(t for t in source if isinstance(t, int))
        return sorted(ids)

    def _signature(self) -> _Signature:
        session = self._session
        inputs = {i.name: i for i in session.get_inputs()}
        if "input_ids" not in inputs:
            raise LoadFailed(f"Model `{self.id}`: the ONNX graph has no `input_ids` input "
                                 f"(inputs: {', '.join(inputs)}); only decoder-only LMs are supported.")
        outputs = [o.name for o in session.get_outputs()]
        past = [n for n in inputs if _PAST.match(n)]
        if not past:
            raise LoadFailed(f"Model `{self.id}`: the ONNX graph has no past_key_values inputs; export it with "
                                 "a KV cache (`omniloader models export-onnx`).")
        present = {}
        for name in outputs:
            if m := _PRESENT.match(name):
                present[name] = f"past_key_values.{m.group(1)}.{m.group(2)}"
        missing = sorted(set(past) - set(present.values()))
        if missing or "logits" not in outputs:
            raise LoadFailed(f"Model `{self.id}`: the ONNX graph lacks outputs for "
                                 f"{', '.join(missing) or 'logits'}.")
        return _Signature(ids_dtype=_ORT_TYPES.get(inputs["input_ids"].type, np.int64), inputs=set(inputs),
                          past=past, present=present,
                          past_shape={n: self._kv_shape(inputs[n].shape) for n in past},
                          past_dtype={n: _ORT_TYPES.get(inputs[n].type, np.float32) for n in past},
                          outputs=["logits", *present])

    def _kv_shape(self, shape: list) -> tuple[int, int]:
        """(kv heads, head dim) of a past input: static dims when the graph has them, else config.json."""
        kv_heads, head_dim = _kv_dims(self._config)
        return (shape[1] if isinstance(shape[1], int) else kv_heads,
                shape[3] if isinstance(shape[3], int) else head_dim)

    def unload(self) -> None:
        self._session = self._tokenizer = self._sig = None
        self._pieces.clear()
        gc.collect()
        _trim_heap()

    # --- model facts -----------------------------------------------------------------------
    def context_length(self) -> int:
        return int(self.manifest.context_length or self._config.get("max_position_embeddings") or DEFAULT_CONTEXT)

    def memory_estimate(self) -> int:
        """Graph + weights files, the fp32 KV cache for the whole context, and a prefill logits buffer."""
        try:
            onnx_file = find_onnx_file(self.record.source_path(), self.manifest.params.get("onnx_file"))
            weights = sum(p.stat().st_size for p in onnx_file.parent.iterdir() if p.is_file() and (
                p.name.startswith(onnx_file.name) or p.suffix in (".data", ".onnx_data")))
        except (LoadFailed, OSError):
            return 0  # the load says what is wrong
        kv_heads, head_dim = _kv_dims(self._config)
        kv = 2 * (self._config.get("num_hidden_layers") or 0) * kv_heads * head_dim * self.context_length() * 4
        logits = self.prefill_chunk * (self._config.get("vocab_size") or 0) * 4
        return int(weights * 1.1) + kv + logits

    # --- tokens ----------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"])

    def detokenize(self, ids: list[int]) -> str:
        check_token_ids(ids, self._n_vocab, HINT_TOKENS)
        return self._tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def piece(self, token: int) -> bytes:
        """The bytes a token adds to the text (special tokens add none), cached."""
        raw = self._pieces.get(token)
        if raw is None:
            raw = b""
            if token not in self._special:
                text = self._tokenizer.convert_ids_to_tokens(token)
                raw = self._bytes_of(text) if self._bytes_of is not None and text is not None else None
                if raw is None:
                    if text is not None and (m := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", text)):
                        raw = bytes([int(m.group(1), 16)])  # SentencePiece byte fallback
                    else:
                        raw = self._tokenizer.decode([token], clean_up_tokenization_spaces=False).encode()
            self._pieces[token] = raw
        return raw

    def render_chat(self, messages: list[dict]) -> str:
        if Capability.CHAT not in self.capabilities:
            raise InvalidInput(f"Model `{self.id}` has no chat template; use /v1/completions.", hint=HINT_MODEL)
        from jinja2 import TemplateError

        try:
            return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except (TemplateError, ValueError, TypeError) as exc:  # the template's raise_exception() included
            raise InvalidInput(f"Model `{self.id}`'s chat template rejected the messages: {exc}",
                                      hint=HINT_PROMPT) from None

    def prompt_tokens(self, params: GenerateParams) -> list[int]:
        if params.suffix is not None:
            raise Unsupported(f"Model `{self.id}` (backend onnx_runtime) does not support `suffix` "
                                         "(fill in the middle).", hint=HINT_SUFFIX)
        if params.messages is not None:
            return self.tokenize(self.render_chat(params.messages), special=True)
        ids = list(self._tokenizer(params.prompt or "", add_special_tokens=True)["input_ids"])
        if not ids:
            bos = self._tokenizer.bos_token_id
            if bos is None:
                raise InvalidInput("The prompt is empty and this model has no beginning-of-sequence "
                                          "token to start from.", hint=HINT_PROMPT)
            ids = [bos]
        return ids

    # --- the model -------------------------------------------------------------------------
    def forward(self, ids: list[int], past: dict | None, n_past: int) -> tuple[np.ndarray, dict]:
        """Run `ids` after `n_past` cached positions: ([len(ids), vocab] logits, the new cache).
        The cache holds onnxruntime OrtValues that go straight back in, never copied to numpy."""
        from onnxruntime import OrtValue

        sig = self._sig
        n = len(ids)
        feed = {"input_ids": OrtValue.ortvalue_from_numpy(np.asarray([ids], dtype=sig.ids_dtype))}
        if "attention_mask" in sig.inputs:
            feed["attention_mask"] = OrtValue.ortvalue_from_numpy(np.ones((1, n_past + n), dtype=np.int64))
        if "position_ids" in sig.inputs:
            feed["position_ids"] = OrtValue.ortvalue_from_numpy(np.arange(n_past, n_past + n, dtype=np.int64)[None])
        if "use_cache_branch" in sig.inputs:  # Optimum's merged decoders
            feed["use_cache_branch"] = OrtValue.ortvalue_from_numpy(np.array([n_past > 0]))
        for name in sig.past:
            if past is None:
                heads, dim = sig.past_shape[name]
                feed[name] = OrtValue.ortvalue_from_numpy(np.zeros((1, heads, 0, dim), dtype=sig.past_dtype[name]))
            else:
                feed[name] = past[name]
        out = self._session.run_with_ort_values(sig.outputs, feed)
        cache = {sig.present[name]: value for name, value in zip(sig.outputs[1:], out[1:])}
        return out[0].numpy()[0], cache

    def prefill(self, ids: list[int], keep_all: bool = False) -> tuple[np.ndarray, dict]:
        """The prompt in chunks: (logits of the last position, or of every position, and the cache)."""
        past, rows = None, []
        logits = np.empty(0)
        for start in range(0, len(ids), self.prefill_chunk):
            logits, past = self.forward(ids[start:start + self.prefill_chunk], past, start)
            if keep_all:
                rows.append(logits.astype(np.float32, copy=True))
        return (np.concatenate(rows) if keep_all else logits[-1].astype(np.float32)), past

    def decode(self, prompt: list[int], max_new: int, choose: Callable[[np.ndarray], int],
               cancel: threading.Event | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """The token loop: yields (token, the raw logits it was chosen from); the next forward pass
        runs only when the consumer asks for the next token, and never after `cancel` is set."""
        logits, past = self.prefill(prompt)
        n = len(prompt)
        for i in range(max_new):
            if cancel is not None and cancel.is_set():
                return
            token = choose(logits)
            yield token, logits
            if i + 1 < max_new:
                step, past = self.forward([token], past, n)
                logits = step[-1].astype(np.float32)
                n += 1

    # --- generation ------------------------------------------------------------------------
    def generate(self, params: GenerateParams, cancel: threading.Event) -> Iterator[Delta]:
        refuse_overlay(params.overlay, self.id, self.backend)
        if params.json_schema is not None:
            raise Unsupported(f"Model `{self.id}` (backend onnx_runtime) does not support `json_schema`.",
                                         hint=HINT_SCHEMA)
        prompt = self.prompt_tokens(params)
        max_new = self.generation_budget(len(prompt), params.max_tokens)
        sampler = Sampler(params, self._n_vocab, self._eos, prompt)
        want_logprobs = params.logprobs or params.top_logprobs > 0
        emit, finish = DeltaEmitter(params.stop), "length"
        tokens = self.decode(prompt, max_new, sampler, cancel)
        try:
            for token, logits in tokens:
                if token in self._eos and not params.ignore_eos:
                    finish = "stop"
                    break
                sampler.accept(token)
                logprob = token_logprob(logits, token, params.top_logprobs, self.piece) if want_logprobs else None
                if delta := emit.push(self.piece(token), logprob):
                    yield delta
                if emit.stopped:
                    break
        finally:
            tokens.close()
        yield emit.finish(finish, len(prompt))

    def score_prompt(self, prompt: str, top: int) -> list[TokenLogprob]:
        tokens = self.prompt_tokens(GenerateParams(prompt=prompt))
        self.generation_budget(len(tokens), 0)
        first = self.piece(tokens[0])
        scored = [TokenLogprob(first.decode("utf-8", errors="replace"), None, list(first))]
        logits, _ = self.prefill(tokens, keep_all=True)
        for i, token in enumerate(tokens[1:]):
            scored.append(token_logprob(logits[i], token, top, self.piece))
        return scored


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise, and RSS would not drop)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
