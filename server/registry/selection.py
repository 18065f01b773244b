"""Which model serves a name: an id or alias as asked, or for `role:<role>` the first candidate having
every required capability (the default model first, then curated, built-in, discovered; then by id),
with the reason it was chosen and why each one before it was passed over."""
from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec

from adapters.errors import EngineError
from server.errors import NoModelQualifies
from server.protocol.models import Rejection, SelectionResult
from server.registry.manifest import ORIGIN_RANK, ModelRecord
from server.registry.state import RegistryState

if TYPE_CHECKING:
    from server.registry.registry import Registry

__all__ = ["DEFAULT_ALIAS", "ROLE_PREFIX", "Selection", "preference", "requirements", "select", "why_not"]

log = logging.getLogger("omniloader.registry")

DEFAULT_ALIAS = "default"
ROLE_PREFIX = "role:"


class Selection(msgspec.Struct):
    record: ModelRecord
    reason: str
    rejected: list[Rejection] = []

    def result(self) -> SelectionResult:
        return SelectionResult(self.record.id, self.reason, self.rejected)


def requirements(require: Iterable[str] | str | None) -> list[str]:
    """`["tools,json_schema", "logprobs"]` -> `["tools", "json_schema", "logprobs"]` (order kept)."""
    items = [require] if isinstance(require, str) else list(require or ())
    return list(dict.fromkeys(c.strip() for item in items for c in item.split(",") if c.strip()))


def select(registry: Registry, name_or_role: str, require: Iterable[str] | str | None = None) -> Selection:
    """The model for an id/alias or `role:<role>` that has every required capability; NoModelQualifies
    (404) says why each candidate was turned down."""
    require = requirements(require)
    needs = f" with {', '.join(require)}" if require else ""
    if registry.names_model(name_or_role) or not name_or_role.startswith(ROLE_PREFIX):
        record = registry.resolve(name_or_role)
        if why := why_not(record, require, registry.state, registry.capabilities(record)):
            raise NoModelQualifies(name_or_role + needs, f"`{record.id}` {why}", [Rejection(record.id, why)])
        named = "" if record.id == name_or_role else f" (`{name_or_role}` names it)"
        return Selection(record, f"`{record.id}` was asked for by name{named}"
                         + (f" and has {', '.join(require)}" if require else ""))
    role = name_or_role.removeprefix(ROLE_PREFIX)
    rejected: list[Rejection] = []
    for record in registry.candidates(role):
        if why := why_not(record, require, registry.state, registry.capabilities(record)):
            rejected.append(Rejection(record.id, why))
            continue
        return Selection(record, _why_chosen(record, role, require, rejected, registry.default_id()), rejected)
    detail = "; ".join(f"`{r.id}` {r.reason}" for r in rejected) or f"no model has role `{role}`"
    raise NoModelQualifies(name_or_role + needs, detail, rejected)


def preference(record: ModelRecord, default_id: str) -> tuple:
    """The order `role:<role>` tries its candidates in."""
    return record.id != default_id, -ORIGIN_RANK[record.origin], record.id


def _why_chosen(record: ModelRecord, role: str, require: list[str], rejected: list[Rejection],
                default_id: str) -> str:
    if record.id == default_id:
        reason = f"`{record.id}` is the default model and has role `{role}`"
    else:
        reason = (f"`{record.id}` is the first {record.origin} model with role `{role}` "
                  "(default first, then curated, built-in, discovered; then by id)")
    if require:
        reason += f" and has {', '.join(require)}"
    return reason + (f"; {len(rejected)} candidate(s) passed over" if rejected else "")


def why_not(record: ModelRecord, require: list[str], state: RegistryState | None, caps: list[str]) -> str | None:
    """Why a record with capabilities `caps` cannot serve a request needing `require`, or None when it can."""
    if missing := [c for c in require if c not in caps]:
        return f"lacks {', '.join(missing)} (capabilities: {', '.join(caps) or 'none'})"
    try:
        path = record.local_path()
    except EngineError as exc:
        return exc.message
    if path is not None and not path.exists():
        return f"has no files at {path}"
    return _integrity_problem(record.id, state)


def _integrity_problem(model_id: str, state: RegistryState | None) -> str | None:
    """From the recorded state only (no hashing here): a locked model whose last verification
    did not match its expected hash cannot be chosen."""
    try:
        row = state.get(model_id) if state is not None else None
    except (sqlite3.Error, OSError) as exc:
        log.warning("registry state unreadable (%s); skipping the lock check of %s", exc, model_id)
        return None
    if row and row.locked and row.sha256 and row.expected_sha256 and row.sha256 != row.expected_sha256:
        return f"is locked to sha256 {row.expected_sha256[:12]}… but last verified as {row.sha256[:12]}…"
    return None
