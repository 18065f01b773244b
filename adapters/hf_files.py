"""What an hf_transformers model's files hold, read without loading them (parameter counts and
shapes from safetensors and GGUF headers, for the memory estimate), and a faster GGUF load."""
from __future__ import annotations

import functools
import json
import mmap
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from adapters.global_state import PATCH_LOCK
from adapters.gguf import parse_gguf_header, read_string

__all__ = ["DEFAULT_CONTEXT", "GENERATIVE_HEADS", "fast_gguf_reads", "gguf_shape", "has_chat_template", "is_causal",
           "kv_cache_bytes", "read_json", "safetensors_params"]

DEFAULT_CONTEXT = 4096
GENERATIVE_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


@contextmanager
def fast_gguf_reads():
    """transformers reads a GGUF through gguf.GGUFReader three times per load (tokenizer, config,
    weights); its np.memmap slicing takes ~10 s per pass over a 49k-token vocabulary, and the
    tensor-name map is rebuilt for each of ~400 tensors. For the duration of a load, the reader
    parses a plain ndarray view of the same mapping (same bytes, no copy) and the name map is
    memoized, under PATCH_LOCK; the patched names behave exactly as the originals."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map

    class PlainArrayReader(reader):
        def _get(self, *args, **kwargs):
            if type(self.data) is not np.ndarray:
                self.data = np.asarray(self.data)
            return super()._get(*args, **kwargs)

    with PATCH_LOCK:
        gguf.GGUFReader, gguf.get_tensor_name_map = PlainArrayReader, functools.lru_cache(maxsize=None)(name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def kv_cache_bytes(config: dict[str, Any], n_ctx: int | None, width: int) -> int:
    layers = config.get("num_hidden_layers", 0)
    heads = config.get("num_attention_heads", 1)
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // max(heads, 1)
    n_ctx = n_ctx or config.get("max_position_embeddings", DEFAULT_CONTEXT)
    return 2 * layers * n_ctx * kv_heads * head_dim * width


def safetensors_params(folder: Path) -> tuple[int, int]:
    """(parameter count, bytes per stored value) from the safetensors headers alone."""
    total, widths = 0, []
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            size, = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
                widths.append(_DTYPE_BYTES.get(info["dtype"], 4))
    if not widths:
        raise ValueError(f"no safetensors weights in {folder}")
    return total, max(set(widths), key=widths.count)


def gguf_shape(path: Path) -> tuple[int, int, dict[str, Any]]:
    """(parameter count, 4, a config-like dict) for a GGUF, reading its header and tensor infos."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _version, n_tensors, meta, pos = parse_gguf_header(data, path)
        n_params = 0
        for _ in range(n_tensors):
            _name, pos = read_string(data, pos)
            n_dims, = struct.unpack_from("<I", data, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", data, pos + 4)
            pos += 4 + 8 * n_dims + 4 + 8  # dims, type, offset
            count = 1
            for dim in dims:
                count *= dim
            n_params += count
    arch = meta["general.architecture"]
    heads = meta.get(f"{arch}.attention.head_count", 1)
    config = {"num_hidden_layers": meta.get(f"{arch}.block_count", 0), "num_attention_heads": heads,
              "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
              "head_dim": meta.get(f"{arch}.attention.key_length"),
              "hidden_size": meta.get(f"{arch}.embedding_length", 0),
              "intermediate_size": meta.get(f"{arch}.feed_forward_length"),
              "vocab_size": meta.get(f"{arch}.vocab_size") or _count(meta.get("tokenizer.ggml.tokens")),
              "max_position_embeddings": meta.get(f"{arch}.context_length", DEFAULT_CONTEXT)}
    return n_params, 4, config


def _count(array: Any) -> int | None:
    """The length of a GGUF array value (read_value gives long arrays as their length)."""
    return len(array) if isinstance(array, list) else array if isinstance(array, int) else None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model folder's config file; {} when absent or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def is_causal(config: dict[str, Any]) -> bool:
    """A generative (decoder) model by its config.json architectures; no architectures: assume so."""
    architectures = config.get("architectures") or []
    return not architectures or any(a.endswith(GENERATIVE_HEADS) for a in architectures)


def has_chat_template(folder: Path, gguf_file: str | None = None) -> bool:
    """Whether the tokenizer in `folder` (or the GGUF's header) carries a chat template."""
    if gguf_file is not None:
        from adapters.gguf import read_gguf_metadata

        try:
            return bool(read_gguf_metadata(folder / gguf_file).get("tokenizer.chat_template"))
        except (OSError, ValueError):
            return False
    return bool(read_json(folder / "tokenizer_config.json").get("chat_template")) or any(
        (folder / name).is_file() for name in ("chat_template.jinja", "chat_template.json"))
