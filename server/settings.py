"""Settings: defaults < environment (OMNILOADER_*) < command-line flags."""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import msgspec

__all__ = ["Settings", "load_settings"]

ENV_PREFIX = "OMNILOADER_"


class Settings(msgspec.Struct, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8000
    models_dir: str = "models"
    lab_dir: str = "lab"
    threads: int | None = None  # llama.cpp threads; None = every core
    api_key: str | None = None
    default_model: str = "smollm2-135m-instruct"
    log_level: str = "info"
    max_memory: str | None = None  # "12G", "800M" or bytes; None = a safe share of this machine's RAM
    max_loaded: int = 8
    max_queue: int = 32
    keep_alive: str = "5m"
    lab_jobs_per_model: int = 1  # Lab jobs running at once on one model (each on its own torch copy)
    lab_max_running: int = 2  # Lab jobs running at once over all models
    lab_max_copies: int = 1  # torch copies of models the Lab keeps loaded between jobs
    aura_cache: int = 8  # aura LoRA adapters kept loaded per model instance (a manifest's params.aura_cache wins)


def load_settings(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Merge env vars and explicit overrides (None values in overrides mean 'not given')."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in Settings.__struct_fields__:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw not in (None, ""):
            values[name] = raw
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(values, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"omniloader: invalid setting: {exc}") from None
