"""`omniloader models export-onnx ID`: a causal LM transformers can load (a Hugging Face folder, or a
GGUF that transformers dequantizes, the default model included) -> a folder the onnx_runtime backend
serves: model.onnx (+ model.onnx.data past 2 GB) taking `past_key_values.{i}.key|value` and giving
`logits` + `present.{i}.key|value`, the tokenizer files, config.json, generation_config.json and a
manifest.yaml (backend onnx_runtime, id `<ID>-onnx`). torch and transformers are imported only here."""
from __future__ import annotations

import argparse
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec.yaml

from adapters.errors import EngineError
from server.errors import ExportFailed, InvalidRequestError, OpenAIError

__all__ = [
    "ExportSource",
    "add_export_arguments",
    "export_command",
    "export_onnx",
    "kv_cache_module",
    "onnx_names",
    "resolve_export_source",
]

# A check the exporter runs on what it wrote: onnxruntime against torch on the same tokens.
CHECK_TOLERANCE = 1e-3
# Sample sizes for tracing: every dynamic dim above 1, so none is specialized to a constant.
_SAMPLE_BATCH, _SAMPLE_SEQ, _SAMPLE_PAST = 2, 3, 5


@dataclass
class ExportSource:
    path: Path  # an HF folder or a .gguf file
    model_id: str  # the id the export is named after: `<model_id>-onnx`
    context_length: int | None = None  # from the source's manifest, when it has one


def add_export_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("id", help="model id or alias (`default` works), or a path to an HF folder or a .gguf file")
    cmd.add_argument("--out", help="output folder (default <models-dir>/<ID>-onnx)")
    cmd.add_argument("--context-length", type=int, help="context length for the manifest (default: the source's)")
    cmd.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    cmd.add_argument("--no-check", action="store_true", help="skip comparing onnxruntime's logits with torch's")


def export_command(registry, args: argparse.Namespace) -> int:
    source = resolve_export_source(registry, args.id)
    out = Path(args.out) if args.out else registry.models_dir / f"{source.model_id}-onnx"
    export_onnx(source, out, force=args.force, check=not args.no_check, context_length=args.context_length)
    return 0


def resolve_export_source(registry, name: str) -> ExportSource:
    """A path on disk, else a registry id/alias whose files are an HF folder or a GGUF."""
    path = Path(name).expanduser()
    if path.exists():
        return ExportSource(path.absolute(), path.stem if path.is_file() else path.absolute().name)
    record = registry.resolve(name)
    if record.manifest.backend == "onnx_runtime":
        raise InvalidRequestError(f"Model `{record.id}` is already an ONNX model.", param="id")
    local = record.local_path()
    if local is None or not local.exists():
        raise InvalidRequestError(f"Model `{record.id}` has no local files to convert ({record.manifest.source}).",
                                  param="id")
    return ExportSource(local, record.id, record.manifest.context_length)


class _Progress:
    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {message}", flush=True)


def export_onnx(source: ExportSource, out: Path, *, force: bool = False, check: bool = True,
                context_length: int | None = None) -> Path:
    """Convert, check and write the folder; it appears under its final name only once complete."""
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()) and not force:
        raise InvalidRequestError(f"{out} already exists; pass --force to replace it.", param="out")
    partial = out.parent / f".{out.name}.partial"  # dot folders are never discovered as models
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    say = _Progress()
    try:
        model, tokenizer = _load_pretrained(source, say)
        _export_graph(model, partial / "model.onnx", say)
        say("saving the tokenizer, config.json and generation_config.json")
        tokenizer.save_pretrained(partial)
        model.config.save_pretrained(partial)
        model.generation_config.save_pretrained(partial)
        if check:
            _check(model, tokenizer, partial / "model.onnx", say)
        context = context_length or source.context_length or getattr(model.config, "max_position_embeddings", None)
        _write_manifest(partial, source, context, bool(tokenizer.chat_template))
    except (OpenAIError, EngineError):
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except Exception as exc:  # torch.export / the ONNX translation fail with many types
        shutil.rmtree(partial, ignore_errors=True)
        raise ExportFailed(f"Exporting `{source.model_id}` to ONNX failed: {type(exc).__name__}: {exc}") from exc
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    say(f"done: {out} ({size / 2**20:.1f} MiB), model id `{source.model_id}-onnx`; a running server picks it up "
        "on POST /api/models/rescan")
    return out


def _load_pretrained(source: ExportSource, say):
    """The model in float32 (what onnxruntime's CPU kernels run) and its tokenizer, local files only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.path.is_file():
        if source.path.suffix != ".gguf":
            raise InvalidRequestError(f"{source.path} is neither a folder nor a .gguf file.", param="id")
        where, kwargs = source.path.parent, {"gguf_file": source.path.name}
        say(f"reading {source.path.name} (transformers dequantizes GGUF weights; this takes a while)")
    else:
        where, kwargs = source.path, {}
        say(f"reading {source.path}")
    tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
    say("tokenizer ready; loading the weights")
    model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=torch.float32, **kwargs)
    model.eval()
    if getattr(model.config, "is_encoder_decoder", False):
        raise InvalidRequestError(f"`{source.model_id}` is an encoder-decoder model; only decoder-only LMs export.",
                                  param="id")
    n_params = sum(p.numel() for p in model.parameters())
    say(f"loaded {type(model).__name__}: {n_params / 1e6:.1f}M parameters, {model.config.num_hidden_layers} layers")
    return model, tokenizer


def onnx_names(n_layers: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names (Optimum's, so either kind of export serves the same way)."""
    kv = [(i, kind) for i in range(n_layers) for kind in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids", *[f"past_key_values.{i}.{k}" for i, k in kv]],
            ["logits", *[f"present.{i}.{k}" for i, k in kv]])


def kv_cache_module(model):
    """The model as a module of flat tensors: (input_ids, attention_mask, position_ids, [past k/v per
    layer]) -> (logits, present k/v per layer); the DynamicCache lives only inside forward."""
    import torch
    from transformers import DynamicCache

    class KVCacheModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.n_layers = model.config.num_hidden_layers

        def forward(self, input_ids, attention_mask, position_ids, past):
            cache = DynamicCache(config=self.model.config)
            for i in range(self.n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return KVCacheModel().eval()


def _kv_dims(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


def _sample_inputs(config) -> tuple[Any, ...]:
    import torch

    b, s, p = _SAMPLE_BATCH, _SAMPLE_SEQ, _SAMPLE_PAST
    kv_heads, head_dim = _kv_dims(config)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (b, s), generator=generator)
    past = [torch.randn(b, kv_heads, p, head_dim, generator=generator) for _ in range(2 * config.num_hidden_layers)]
    return ids, torch.ones(b, p + s, dtype=torch.int64), torch.arange(p, p + s).repeat(b, 1), past


def _export_graph(model, path: Path, say) -> None:
    import torch

    n_layers = model.config.num_hidden_layers
    inputs, outputs = onnx_names(n_layers)
    batch, seq, past = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence"))
    cache = {0: batch, 2: past}
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
               "position_ids": {0: batch, 1: seq}, "past": [cache] * (2 * n_layers)}
    say(f"exporting with torch.export (dynamo) and translating to ONNX ({n_layers} layers of KV cache)")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" and such
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and axis-naming chatter from the exporter
        program = torch.onnx.export(kv_cache_module(model), _sample_inputs(model.config), dynamo=True,
                                    dynamic_shapes=dynamic, input_names=inputs, output_names=outputs,
                                    external_data=True, verbose=None)  # None: its own phase lines
    say(f"writing {path.name} (weights go to {path.name}.data past 2 GB)")
    program.save(path, external_data=None)


def _check(model, tokenizer, path: Path, say) -> float:
    """onnxruntime vs torch on a real prompt (one pass) then one cached decode step: the max |logit diff|."""
    import numpy as np
    import onnxruntime as ort
    import torch

    ids = tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"][:12]
    ids = ids if len(ids) >= 2 else [0, 1, 2, 3]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    kv_heads, head_dim = _kv_dims(model.config)
    inputs, outputs = onnx_names(model.config.num_hidden_layers)
    prompt, last = ids[:-1], ids[-1:]
    feed = {"input_ids": np.array([prompt]), "attention_mask": np.ones((1, len(prompt)), np.int64),
            "position_ids": np.arange(len(prompt))[None]}
    feed |= {name: np.zeros((1, kv_heads, 0, head_dim), np.float32) for name in inputs[3:]}
    first = session.run(None, feed)
    feed = {"input_ids": np.array([last]), "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.array([[len(prompt)]])}
    feed |= {name: value for name, value in zip(inputs[3:], first[1:])}
    step = session.run(outputs[:1], feed)[0]
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits.numpy()
    diff = float(max(np.abs(first[0] - reference[:, :-1]).max(), np.abs(step - reference[:, -1:]).max()))
    say(f"check: onnxruntime vs torch logits on {len(ids)} tokens (prompt + one cached step): max |diff| = {diff:.2e}")
    if diff > CHECK_TOLERANCE:
        raise ExportFailed(f"The exported graph disagrees with torch: max |logit diff| {diff:.2e} > "
                           f"{CHECK_TOLERANCE:.0e}. Nothing was written.")
    return diff


def _write_manifest(folder: Path, source: ExportSource, context: int | None, chat: bool) -> None:
    manifest: dict[str, Any] = {
        "id": f"{source.model_id}-onnx",
        "backend": "onnx_runtime",
        "source": ".",
        "roles": ["chat"] if chat else ["completion"],
        "capabilities": (["chat"] if chat else []) + ["completion", "logprobs"],
        "description": f"ONNX export of {source.model_id} ({source.path.name}), float32",
    }
    if context:
        manifest["context_length"] = int(context)
    (folder / "manifest.yaml").write_bytes(msgspec.yaml.encode(manifest))
