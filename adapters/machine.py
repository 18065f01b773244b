"""What this machine has and holds: physical cores, accelerators torch can see, RAM, this
process's resident size; and memory sizes as people write them ("12G")."""
from __future__ import annotations

import functools
import importlib.util
import os
import re

__all__ = ["physical_cores", "accelerators", "total_ram", "default_budget", "parse_size", "process_rss"]


@functools.cache
def physical_cores() -> int:
    """Cores, not hyper-threads: llama.cpp runs best with one thread per physical core."""
    try:
        with open("/proc/cpuinfo") as f:
            cores, physical = set(), "0"
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    physical = value.strip()
                elif key.strip() == "core id":
                    cores.add((physical, value.strip()))
        return len(cores) or os.cpu_count() or 1
    except OSError:
        return os.cpu_count() or 1


@functools.cache
def accelerators() -> tuple[str, ...]:
    """CUDA / ROCm / Metal devices visible through torch when it is installed (it is optional).
    Importing torch takes seconds, so this runs once, off the event loop, on first use."""
    if importlib.util.find_spec("torch") is None:
        return ()
    import torch

    found = []
    if torch.cuda.is_available():
        kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        found += [f"{kind}:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return tuple(found)


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
