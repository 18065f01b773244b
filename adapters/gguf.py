"""Reads a GGUF file's metadata (key/value header) fast, without loading tensors: the router
needs a model's shape before loading it, and gguf.GGUFReader takes seconds on a 49k-token vocab."""
from __future__ import annotations

import logging
import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["GGUFHeader", "parse_gguf_header", "read_gguf_header", "read_gguf_metadata", "gguf_footprint", "read_string",
           "read_value"]

log = logging.getLogger("omniloader.gguf")

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFHeader(NamedTuple):
    version: int
    tensor_count: int
    metadata: dict[str, Any]
    end: int = 0  # where the tensor infos start


def parse_gguf_header(data, path: Path | str = "", *, max_array: int = 16) -> GGUFHeader:
    """The header of a GGUF held in `data` (an mmap or bytes): every metadata key, scalars and strings as
    values, arrays as lists when they have at most `max_array` items, else as their length."""
    if data[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file")
    version, = struct.unpack_from("<I", data, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is too old")
    tensors, count = struct.unpack_from("<QQ", data, 8)
    pos, meta = 24, {}
    for _ in range(count):
        key, pos = read_string(data, pos)
        kind, = struct.unpack_from("<I", data, pos)
        meta[key], pos = read_value(data, pos + 4, kind, max_array)
    return GGUFHeader(version, tensors, meta, pos)


def read_gguf_header(path: Path, *, max_array: int = 16) -> GGUFHeader:
    """The header of the GGUF file at `path` (a 49k-token vocabulary becomes an int: see parse_gguf_header)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return parse_gguf_header(data, path, max_array=max_array)


def read_gguf_metadata(path: Path, *, max_array: int = 16) -> dict[str, Any]:
    return read_gguf_header(path, max_array=max_array).metadata


def read_string(data, pos: int) -> tuple[str, int]:
    size, = struct.unpack_from("<Q", data, pos)
    return bytes(data[pos + 8:pos + 8 + size]).decode("utf-8", errors="replace"), pos + 8 + size


def read_value(data, pos: int, kind: int, max_array: int) -> tuple[Any, int]:
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, data, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return read_string(data, pos)
    if kind != _ARRAY:
        raise ValueError(f"unknown GGUF value type {kind}")
    item, n = struct.unpack_from("<IQ", data, pos)
    pos += 12
    if item in _SCALARS and n > max_array:  # skip fixed-size items in one step
        return n, pos + n * struct.calcsize(_SCALARS[item])
    items = []
    for _ in range(n):
        value, pos = read_value(data, pos, item, max_array)
        if n <= max_array:
            items.append(value)
    return (items if n <= max_array else n), pos


def gguf_footprint(path: Path, n_ctx: int | None, n_batch: int = 512) -> int:
    """Weights + f16 KV cache for n_ctx + the logits buffer, from the GGUF header alone."""
    size = path.stat().st_size
    try:
        meta = read_gguf_metadata(path)
        arch = meta["general.architecture"]
        layers = meta.get(f"{arch}.block_count", 0)
        heads = meta.get(f"{arch}.attention.head_count", 1)
        kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
        head_dim = meta.get(f"{arch}.attention.key_length", meta.get(f"{arch}.embedding_length", 0) // max(heads, 1))
        n_ctx = n_ctx or meta.get(f"{arch}.context_length", 4096)
        vocab = meta.get("tokenizer.ggml.tokens", 0)
    except (ValueError, KeyError, OSError) as exc:  # an unreadable header: the load itself will say what is wrong
        log.debug("no GGUF header estimate for %s: %s", path, exc)
        return int(size * 1.3)
    kv_cache = 2 * layers * n_ctx * kv_heads * head_dim * 2
    return size + kv_cache + n_batch * vocab * 4 + (32 << 20)
