"""Auras: named stacks of what the Lab taught a model (prompt deltas, token biases, LoRAs, steering
vectors), stored under `<lab dir>/auras/` and served per request as `model: "base+aura"`.

- store.py: AuraStore — read, list, write a job's components, compose, delete; hash checks
- overlay.py: AuraOverlay (what a request gets) and AuraResolver (set on ModelPool.overlays)
- components.py: names and component checks; files.py: atomic writes and hash caches
- errors.py: 404 / 400 / 409 in the OpenAI error shape"""
from server.lab.auras.errors import AuraBaseChanged, AuraBaseMismatch, AuraCorrupt, AuraExists, AuraHashMismatch, \
    AuraNotFound
from server.lab.auras.overlay import AuraOverlay, AuraResolver
from server.lab.auras.store import AURA_FILE, AuraStore

__all__ = ["AURA_FILE", "AuraStore", "AuraOverlay", "AuraResolver", "AuraNotFound", "AuraBaseMismatch",
           "AuraHashMismatch", "AuraBaseChanged", "AuraExists", "AuraCorrupt"]
