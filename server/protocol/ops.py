"""Operational endpoints: /health, /api/ps (resident models), /api/system (machine facts)."""
from __future__ import annotations

import msgspec

__all__ = ["Health", "RunningModel", "RunningModels", "SystemInfo"]


class Health(msgspec.Struct):
    status: str
    models: list[str]


class RunningModel(msgspec.Struct):
    id: str
    backend: str
    memory_bytes: int
    estimated_bytes: int
    measured_bytes: int
    active: int
    queued: int
    parallel: int
    keep_alive: float | None  # seconds; null = forever
    expires_at: str | None  # ISO time the idle model unloads; null while busy or kept forever


class RunningModels(msgspec.Struct):
    models: list[RunningModel]
    memory_budget_bytes: int
    memory_used_bytes: int


class SystemInfo(msgspec.Struct):
    platform: str
    python: str
    cpu_count: int
    physical_cores: int
    ram_bytes: int
    memory_budget_bytes: int
    accelerators: list[str]
    default_threads: int
