"""Hugging Face models through transformers + torch: HF folders (config.json + safetensors +
tokenizer files) or a GGUF dequantized by transformers. The Lab's engine of choice: the torch
module and tokenizer are handed out through torch_handle(); LoRA adapters load through peft.

Nothing here touches the network: transformers and huggingface_hub run offline and every
from_pretrained() is local_files_only."""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.base import Adapter, Capability, Delta, GenerateParams, TokenLogprob
from adapters.errors import (
    HINT_ECHO,
    HINT_INPUT,
    HINT_LOGPROBS,
    HINT_LORA,
    HINT_MODEL,
    HINT_PROMPT,
    HINT_SCHEMA,
    HINT_SUFFIX,
    HINT_TOKENS,
    ContextTooLong,
    InvalidInput,
    LoadFailed,
    Unsupported,
)
from adapters.global_state import PATCH_LOCK
from adapters.hf_files import (
    DEFAULT_CONTEXT,
    fast_gguf_reads,
    gguf_shape,
    has_chat_template,
    is_causal,
    kv_cache_bytes,
    read_json,
    safetensors_params,
)
from adapters.hf_sampling import constraints_available, token_bytes_table
from adapters.logprobs import token_logprob
from adapters.sampling import Sampler
from adapters.text import DeltaEmitter
from adapters.tokens import check_token_ids
from adapters.torch_overlay import TorchOverlays

__all__ = ["HFTransformersAdapter", "TorchHandle"]

log = logging.getLogger("omniloader.hf_transformers")

EMBED_BATCH = 32
_TORCH_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class TorchHandle:
    """What the Lab works on: the live torch module (LoRA layers included once loaded), its
    tokenizer, and where it runs. Use it on the model's worker thread (worker.call)."""

    model: Any  # transformers PreTrainedModel (torch.nn.Module)
    tokenizer: Any  # transformers tokenizer
    device: str
    dtype: str
    causal: bool  # a generative (decoder) model; False for an encoder such as BERT


def _offline() -> None:
    """Weights come from local paths only: no hub look-ups, downloads or telemetry, whatever the
    environment says (every from_pretrained() below is also local_files_only)."""
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")


class HFTransformersAdapter(Adapter):
    backend = "hf_transformers"
    supported = frozenset({Capability.CHAT, Capability.COMPLETION, Capability.EMBEDDINGS, Capability.TOOLS,
                              Capability.JSON_SCHEMA, Capability.LOGPROBS, Capability.TORCH, Capability.LORA})

    @classmethod
    def probe_capabilities(cls, record) -> frozenset[str]:
        """What load() will find, from config.json, the tokenizer files or the GGUF header."""
        try:
            path = record.source_path()
        except LoadFailed:
            return cls.supported
        gguf_file = path.name if path.suffix == ".gguf" else record.manifest.params.get("gguf_file")
        folder = path.parent if path.suffix == ".gguf" else path
        causal = gguf_file is not None or is_causal(read_json(folder / "config.json"))
        return _found_capabilities(causal, has_chat_template(folder, gguf_file),
                                   gguf_file is not None or (folder / "tokenizer.json").is_file())

    def __init__(self, record, settings=None) -> None:
        super().__init__(record, settings)
        self._model = None
        self._tokenizer = None
        self._peft = None  # peft.PeftModel wrapping self._model once a LoRA is loaded
        self._loras: set[str] = set()
        self._active_lora: str | None = None
        self._constraints = None
        self._overlays: TorchOverlays | None = None  # an aura's LoRA / steering hooks, per generation
        self._pieces: list[bytes] = []
        self._eos: list[int] = []
        self._causal = True
        self._device = "cpu"
        self._n_ctx = DEFAULT_CONTEXT

    # --- loading ---------------------------------------------------------------------------
    def _files(self) -> tuple[Path, str | None]:
        """(folder, gguf file name or None) for the source: a HF folder, a .gguf, or a folder + params.gguf_file."""
        path = self.record.source_path()
        if path.is_file() and path.suffix == ".gguf":
            return path.parent, path.name
        if not path.is_dir():
            raise LoadFailed(f"Model `{self.id}`: no HF folder or GGUF file at {path}.")
        return path, self.manifest.params.get("gguf_file")

    def _device_and_dtype(self, torch):
        params = self.manifest.params
        device = params.get("device", "auto")
        if device == "auto":
            mps = getattr(torch.backends, "mps", None)
            device = "cuda" if torch.cuda.is_available() else "mps" if mps and mps.is_available() else "cpu"
        name = params.get("dtype")
        if name in (None, "default"):
            name = "float32" if device == "cpu" else (
                "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float16")
        if name == "auto":
            return device, "auto"
        if name not in _TORCH_DTYPES:
            raise LoadFailed(f"Model `{self.id}`: params.dtype `{name}` is not one of {sorted(_TORCH_DTYPES)} or auto.")
        return device, getattr(torch, name)

    def load(self, progress: Callable[[float], None] | None = None) -> None:
        report = progress or (lambda _f: None)
        _offline()
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise LoadFailed(f"Model `{self.id}` needs torch and transformers: pip install 'omniloader[hf]' "
                                 f"({exc}).") from exc
        folder, gguf_file = self._files()
        device, dtype = self._device_and_dtype(torch)
        threads = self.manifest.params.get("threads") or getattr(self.settings, "threads", None)
        if threads:
            with PATCH_LOCK:  # process-wide: one load sets it at a time
                torch.set_num_threads(int(threads))
        config = read_json(folder / "config.json")
        self._causal = gguf_file is not None or is_causal(config)
        kwargs = {"local_files_only": True, **({"gguf_file": gguf_file} if gguf_file else {})}
        try:
            with fast_gguf_reads():
                self._tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)
                report(0.2)
                auto = transformers.AutoModelForCausalLM if self._causal else transformers.AutoModel
                model = auto.from_pretrained(str(folder), dtype=dtype, **kwargs)
        except (OSError, ValueError, RuntimeError, KeyError, ImportError) as exc:
            raise LoadFailed(f"Model `{self.id}` failed to load from {folder}: {exc}") from exc
        report(0.9)
        self._model = model.to(device).eval()
        self._device = device
        self._finish_load(model.config)
        report(1.0)

    def _finish_load(self, config) -> None:
        n_vocab = self._model.get_input_embeddings().num_embeddings
        self._pieces = token_bytes_table(self._tokenizer, n_vocab)
        self._n_ctx = self.manifest.context_length or getattr(config, "max_position_embeddings", None) or DEFAULT_CONTEXT
        cache = self.manifest.params.get("aura_cache") or getattr(self.settings, "aura_cache", None) or 8
        self._overlays = TorchOverlays(lambda: self._model, self.id, cache)
        eos = {self._tokenizer.eos_token_id, *_as_list(getattr(config, "eos_token_id", None))}
        generation = getattr(self._model, "generation_config", None)
        eos.update(_as_list(getattr(generation, "eos_token_id", None)))
        self._eos = sorted(t for t in eos if t is not None)
        self.report_capabilities(_found_capabilities(self._causal, bool(self._tokenizer.chat_template),
                                                     self._tokenizer.is_fast))

    def unload(self) -> None:
        self._model = self._peft = self._tokenizer = self._constraints = self._overlays = None
        self._pieces, self._loras, self._active_lora = [], set(), None
        self.capabilities = frozenset()
        import gc

        gc.collect()

    def torch_handle(self) -> TorchHandle:
        self._require(Capability.TORCH, HINT_MODEL)
        return TorchHandle(self._model, self._tokenizer, self._device, str(self._model.dtype).removeprefix("torch."),
                           self._causal)

    def context_length(self) -> int:
        return self._n_ctx

    def _require(self, capability: str, hint: str) -> None:
        if self._model is None:
            raise LoadFailed(f"Model `{self.id}` is not loaded.")
        if capability not in self.capabilities:
            raise Unsupported(f"Model `{self.id}` (backend {self.backend}) does not support `{capability}`.",
                              hint=hint)

    # --- tokens ----------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        if special:
            return self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def detokenize(self, ids: list[int]) -> str:
        check_token_ids(ids, len(self._pieces), HINT_TOKENS)
        return self._tokenizer.decode(ids)

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text for a conversation, through the tokenizer's chat template (and the
        default system prompt the template adds)."""
        from jinja2 import TemplateError

        self._require(Capability.CHAT, HINT_PROMPT)
        try:
            return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:  # the template refuses this conversation (roles, order, ...)
            raise InvalidInput(f"Model `{self.id}`'s chat template rejected the messages: {exc}",
                                      hint=HINT_PROMPT) from None

    def prompt_tokens(self, params: GenerateParams) -> list[int]:
        if params.messages is not None:
            return self.tokenize(self.render_chat(params.messages), special=True)
        self._require(Capability.COMPLETION, HINT_PROMPT)
        if params.suffix is not None:
            raise Unsupported(f"Model `{self.id}` (backend {self.backend}) does not support `suffix` "
                                         "(fill in the middle).", hint=HINT_SUFFIX)
        return self._tokenizer(params.prompt or "", add_special_tokens=True)["input_ids"]

    # --- generation ------------------------------------------------------------------------
    def _step(self, ids: list[int], cache):
        """Feed ids after what the cache holds; the last position's logits (float32, CPU) and the cache."""
        import torch

        out = self._model(input_ids=torch.tensor([ids], device=self._device), past_key_values=cache, use_cache=True)
        return out.logits[0, -1].float().cpu(), out.past_key_values

    def _constraint(self, schema: dict | None):
        if schema is None:
            return None
        self._require(Capability.JSON_SCHEMA, HINT_SCHEMA)
        if self._constraints is None:
            from adapters.hf_sampling import JsonConstraints

            self._constraints = JsonConstraints(self._tokenizer, len(self._pieces), self._tokenizer.eos_token_id)
        return self._constraints.start(schema)

    def generate(self, params: GenerateParams, cancel: threading.Event) -> Iterator[Delta]:
        import torch

        prompt = self.prompt_tokens(params)
        max_new = self.generation_budget(len(prompt), params.max_tokens)
        if params.logprobs or params.top_logprobs:
            self._require(Capability.LOGPROBS, HINT_LOGPROBS)
        sampler = Sampler(params, len(self._pieces), self._eos, prompt)  # refuses a logit_bias outside the vocabulary
        constraint = self._constraint(params.json_schema)
        want_logprobs = params.logprobs or params.top_logprobs > 0
        emit, finish = DeltaEmitter(params.stop), "length"
        with torch.inference_mode(), self._overlays.applied(params.overlay):  # hooks off again however it ends
            logits, cache = self._step(prompt, None)
            while max_new > 0 and not cancel.is_set():
                token = sampler(logits.numpy(), constraint.allowed() if constraint else None)
                if token in self._eos and not params.ignore_eos:
                    finish = "stop"
                    break
                sampler.accept(token)
                logprob = (token_logprob(logits.numpy(), token, params.top_logprobs, self._piece)
                           if want_logprobs else None)
                if delta := emit.push(self._piece(token), logprob):
                    yield delta
                if constraint is not None:
                    constraint.advance(token)
                if emit.stopped or (constraint is not None and constraint.complete):
                    finish = "stop"
                    break
                if emit.produced >= max_new or cancel.is_set():
                    break
                logits, cache = self._step([token], cache)
        yield emit.finish(finish, len(prompt))

    def _piece(self, token: int) -> bytes:
        return self._pieces[token]

    def score_prompt(self, prompt: str, top: int) -> list[TokenLogprob]:
        import torch

        self._require(Capability.LOGPROBS, HINT_ECHO)
        tokens = self.prompt_tokens(GenerateParams(prompt=prompt))
        self.generation_budget(len(tokens), 0)
        if not tokens:
            return []
        first = self._piece(tokens[0])
        scored = [TokenLogprob(first.decode("utf-8", errors="replace"), None, list(first))]
        with torch.inference_mode():
            logits = self._model(input_ids=torch.tensor([tokens], device=self._device)).logits[0].float().cpu()
        for i in range(len(tokens) - 1):
            scored.append(token_logprob(logits[i].numpy(), tokens[i + 1], top, self._piece))
        return scored

    # --- embeddings ------------------------------------------------------------------------
    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean pooling of the last hidden states over the attention mask, L2-normalized."""
        import torch

        self._require(Capability.EMBEDDINGS, HINT_MODEL)
        limit = self._n_ctx
        encoded = [self._tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts]
        for i, ids in enumerate(encoded):
            if len(ids) > limit:
                raise ContextTooLong(f"Input {i} has {len(ids)} tokens; this model embeds at most {limit}.",
                                            hint=HINT_INPUT)
        pad = self._tokenizer.pad_token_id
        batch = EMBED_BATCH if pad is not None else 1
        vectors: list[list[float]] = []
        with torch.inference_mode():
            for start in range(0, len(encoded), batch):
                chunk = encoded[start:start + batch]
                width = max(len(ids) for ids in chunk)
                ids = torch.tensor([x + [pad or 0] * (width - len(x)) for x in chunk], device=self._device)
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=self._device)
                out = self._model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                hidden = out.hidden_states[-1].float()
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
                vectors.extend(torch.nn.functional.normalize(pooled, dim=-1).cpu().tolist())
        return vectors, sum(len(ids) for ids in encoded)

    # --- LoRA ------------------------------------------------------------------------------
    def load_lora(self, name: str, path: str | Path) -> None:
        """Load a peft LoRA adapter next to the base weights (inactive until set_lora(name))."""
        self._require(Capability.LORA, HINT_LORA)
        from peft import PeftModel

        if name in self._loras:
            raise InvalidInput(f"LoRA `{name}` is already loaded on `{self.id}`.", hint=HINT_LORA)
        try:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._model, str(path), adapter_name=name, is_trainable=False)
            else:
                self._peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise InvalidInput(f"LoRA `{name}` failed to load from {path}: {exc}", hint=HINT_LORA) from exc
        self._loras.add(name)
        self.set_lora(self._active_lora)

    def set_lora(self, name: str | None) -> None:
        """Serve with LoRA `name`, or with the base weights alone (None). No reload either way."""
        if name is not None and name not in self._loras:
            raise InvalidInput(f"LoRA `{name}` is not loaded on `{self.id}`.", hint=HINT_LORA)
        if self._peft is not None:
            if name is None:
                self._peft.base_model.disable_adapter_layers()
            else:
                self._peft.set_adapter(name)
                self._peft.base_model.enable_adapter_layers()
        self._active_lora = name

    def unload_lora(self, name: str) -> None:
        if name not in self._loras:
            raise InvalidInput(f"LoRA `{name}` is not loaded on `{self.id}`.", hint=HINT_LORA)
        if self._active_lora == name:
            self.set_lora(None)
        self._loras.discard(name)
        if self._loras:
            self._peft.delete_adapter(name)
        else:  # the last one: take the LoRA layers out, back to the plain base modules
            self._model = self._peft.unload()
            self._peft = None

    def loras(self) -> tuple[list[str], str | None]:
        return sorted(self._loras), self._active_lora

    # --- memory ----------------------------------------------------------------------------
    def model_config(self) -> dict:
        """The model's shape without loading it: config.json, or a config-like dict from the GGUF header
        (layers, hidden and feed-forward sizes, heads, vocabulary, context)."""
        folder, gguf_file = self._files()
        return gguf_shape(folder / gguf_file)[2] if gguf_file else read_json(folder / "config.json")

    def memory_estimate(self) -> int:
        """Weights (parameter count x the dtype they load as) + a KV cache for the whole context."""
        try:
            folder, gguf_file = self._files()
            target = self.manifest.params.get("dtype")
            if gguf_file:
                n_params, stored, shape = gguf_shape(folder / gguf_file)
            else:
                n_params, stored = safetensors_params(folder)
                shape = read_json(folder / "config.json")
            width = _TORCH_DTYPES.get(target, 4 if target in (None, "default") else stored)
        except (OSError, ValueError, KeyError, LoadFailed, EOFError):
            return 0  # the load says what is wrong
        return n_params * width + kv_cache_bytes(shape, self.manifest.context_length, width) + (64 << 20)


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _found_capabilities(causal: bool, chat_template: bool, fast_tokenizer: bool) -> set[str]:
    """What a loaded model can do: an encoder embeds; a decoder also completes, scores and takes
    LoRA; with a chat template it chats; a fast tokenizer lets llguidance constrain its JSON."""
    caps = {Capability.EMBEDDINGS, Capability.TORCH}
    if causal:
        caps |= {Capability.COMPLETION, Capability.LOGPROBS, Capability.LORA}
        if chat_template:
            caps.add(Capability.CHAT)
            if constraints_available() and fast_tokenizer:
                caps |= {Capability.TOOLS, Capability.JSON_SCHEMA}
    return caps
