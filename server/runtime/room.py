"""The pool's eviction policy: what gives way when a load needs memory (or a serving slot)."""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from server.errors import InsufficientMemory
from server.keep_alive import FOREVER
from server.runtime.instance import LAB, SERVE, Instance

if TYPE_CHECKING:
    from server.runtime.pool import ModelPool

__all__ = ["too_big", "make_room", "eviction_order"]

log = logging.getLogger("omniloader.pool")


def too_big(needed: int, budget: int, what: str) -> None:
    if needed > budget:
        raise InsufficientMemory(f"{what} needs about {needed >> 20} MiB, more than the whole budget of "
                                 f"{budget >> 20} MiB (--max-memory).")


def eviction_order(instance: Instance) -> tuple[float, float]:
    """Earliest to expire first: least recently used with the shortest keep-alive."""
    keep = instance.keep_alive
    return (instance.last_used + keep if keep != FOREVER else math.inf), instance.last_used


async def make_room(pool: ModelPool, needed: int, what: str, *, serving: bool) -> None:
    """Until `needed` more bytes fit (and, for a serving instance, a serving place is free): unload
    idle Lab copies, then idle serving instances; a busy serving instance is marked and waited for,
    never cut off. Memory that busy Lab copies hold cannot be waited for: 507."""
    budget = pool.config.max_memory
    while True:
        short = pool.used_memory() + needed > budget
        if not short and not (serving and len(pool.residents()) >= pool.config.max_loaded):
            return
        copies = pool.instances(LAB)
        if short and (idle := [c for c in copies if not c.busy]):
            pool._unload(min(idle, key=lambda c: c.last_used), "evicted")
            continue
        residents = pool.instances(SERVE)
        if not residents:
            held = sum(c.memory for c in copies)
            raise InsufficientMemory(
                f"{what} needs about {needed >> 20} MiB; running Lab jobs hold {held >> 20} MiB of the "
                f"{budget >> 20} MiB budget (--max-memory). Retry when they finish.")
        if idle := [r for r in residents if not r.busy]:
            pool._unload(min(idle, key=eviction_order), "evicted")
            continue
        victim = min(residents, key=eviction_order)
        victim.unload_when_idle = True
        log.info("waiting for %s to finish its requests to make room", victim.key)
        await victim.idle.wait()
        if victim.key in pool.resident() and not victim.busy:
            pool._unload(victim, "evicted")
