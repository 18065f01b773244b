"""What this machine has: physical cores and the accelerators torch can see."""
from __future__ import annotations

import functools
import importlib.util
import os

__all__ = ["physical_cores", "accelerators"]


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
