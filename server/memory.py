"""Memory facts for the router: machine RAM, this process's resident size, a GGUF's footprint."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from server.gguf_header import read_gguf_metadata

__all__ = ["total_ram", "default_budget", "parse_size", "process_rss", "gguf_footprint"]

log = logging.getLogger("omniloader.memory")

DEFAULT_SHARE = 0.6  # leave the rest to the OS, the Lab's torch copies and everything else


def total_ram() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX (Windows)
        try:
            import psutil

            return psutil.virtual_memory().total
        except ImportError:
            return 8 << 30


def default_budget() -> int:
    return int(total_ram() * DEFAULT_SHARE)


def parse_size(text: str | int | None) -> int:
    """"12G", "800MB", "1.5GiB" or a number of bytes; None -> the default budget."""
    if text is None or text == "":
        return default_budget()
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if match is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 12G or 800M)")
    power = "KMGT".find(match.group(2).upper()) + 1 if match.group(2) else 0
    return int(float(match.group(1)) * (1024 ** power))


def process_rss() -> int:
    """Bytes of RAM this process holds now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except ImportError:
            return 0


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
