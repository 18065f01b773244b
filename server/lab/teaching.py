"""Teaching, as the Lab's controllers see it: the correction queue (POST/GET/DELETE /lab/queue) and
what a training job needs from the server around its engine — the queued corrections of a live
run, the aura a run writes into, and marking the corrections a run used."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.errors import InvalidRequestError, JobNotFound, decode_body
from server.lab.corrections import CorrectionStore
from server.lab.auras import AuraStore
from server.lab.lab_models import lab_record
from server.lab.runner_jobs import RUNNER_KEY
from server.protocol.corrections import Correction, CorrectionRequest
from server.registry import Registry
from server.serving.recent import RecentCompletions

if TYPE_CHECKING:
    from server.lab.job_store import JobRow

__all__ = ["TRAIN_KINDS", "AURA_NAME", "Teaching"]

TRAIN_KINDS = ("train_target", "train_live")
AURA_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_ROLES = ("system", "user", "assistant", "developer")


def _check_messages(messages: list[dict[str, Any]], param: str) -> None:
    if not messages:
        raise InvalidRequestError("`messages` is empty.", param=param)
    for i, message in enumerate(messages):
        if message.get("role") not in _ROLES or not isinstance(message.get("content"), str):
            raise InvalidRequestError(f"Message {i} needs a `role` ({', '.join(_ROLES)}) and a text `content`.",
                                      param=f"{param}[{i}]")


class Teaching:
    def __init__(self, registry: Registry, corrections: CorrectionStore, auras: AuraStore, lab_dir: Path) -> None:
        self.registry = registry
        self.corrections = corrections
        self.auras = auras
        self.lab_dir = Path(lab_dir)
        self.recent: RecentCompletions | None = None  # chat completions a correction may name (set by the app)

    # --- the queue --------------------------------------------------------------------------
    def queue(self, body: bytes) -> Correction:
        req: CorrectionRequest = decode_body(body, CorrectionRequest)
        record = self.registry.resolve(req.model.partition("+")[0])
        lab_record(record)  # a model without torch weights cannot be taught: 400 naming `model`
        if not req.good.strip():
            raise InvalidRequestError("`good` is empty: give the answer the model should have given.", param="good")
        messages, prompt, bad = req.messages, req.prompt, req.bad
        if req.completion_id is not None:
            done = self.recent.get(req.completion_id) if self.recent is not None else None
            if done is None:
                raise InvalidRequestError(f"No recent chat completion `{req.completion_id}` (only the last "
                                          "1000 are kept; give `messages` instead).", param="completion_id")
            if done.model.partition("+")[0] != record.id:
                raise InvalidRequestError(f"Completion `{req.completion_id}` came from `{done.model}`, not "
                                          f"`{record.id}`.", param="completion_id")
            messages, prompt, bad = done.messages, None, bad if bad is not None else done.answer
        elif (prompt is None) == (messages is None):
            raise InvalidRequestError("Give exactly one of `prompt` or `messages` (or a `completion_id`).",
                                      param="prompt")
        if messages is not None:
            _check_messages(messages, "messages")
        elif not prompt.strip():
            raise InvalidRequestError("`prompt` is empty.", param="prompt")
        return self.corrections.add(model=record.id, good=req.good, prompt=prompt, messages=messages, bad=bad,
                                    completion_id=req.completion_id)

    def listed(self, model: str | None) -> list[Correction]:
        model_id = self.registry.resolve(model).id if model else None
        return self.corrections.list(model=model_id)

    def delete(self, correction_id: str) -> None:
        if not self.corrections.delete(correction_id):
            raise JobNotFound(f"No correction `{correction_id}`: GET /lab/queue lists them.", param="id")

    # --- around a training job --------------------------------------------------------------
    def prepare(self, kind: str, model_id: str, data: dict[str, Any]) -> dict[str, Any]:
        """Server-side fields of a training spec, taken out of the body before the engine's spec is
        decoded: the aura to write into, and (train_live) the model's queued corrections."""
        extra: dict[str, Any] = {}
        aura = data.pop("aura", None)
        if aura is not None:
            if not isinstance(aura, str) or not AURA_NAME.match(aura):
                raise InvalidRequestError("`aura` must be a name of lowercase letters, digits, `-` and `_` "
                                          "(at most 64).", param="aura")
            extra["aura"] = aura
        record = self.registry.get(model_id)
        data["base_sha256"] = self.auras.base_sha256(record) or ""  # written into the component files
        if kind == "train_live":
            queued = self.corrections.list(model=model_id, status="queued")
            if not queued:
                raise InvalidRequestError(f"No queued corrections for `{model_id}`: POST /lab/queue first.",
                                          param="model")
            data["corrections"] = [{k: v for k, v in (("prompt", c.prompt), ("messages", c.messages),
                                                       ("good", c.good), ("bad", c.bad)) if v is not None}
                                   for c in queued]
            extra["correction_ids"] = [c.id for c in queued]
        return extra

    def finished(self, row: JobRow, result: dict[str, Any]) -> dict[str, Any]:
        """After a training job succeeded and was not reverted: write its components into its aura (the one
        named, or a new `<method>-<job>`), mark the corrections it used, and say how to serve it."""
        if row.kind not in TRAIN_KINDS or RUNNER_KEY in row.spec or result.get("reverted"):
            return {}
        components = result.get("components") or []
        name = row.spec.get("aura") or f"{result.get('method', 'taught')}-{row.id.removeprefix('job_')[:8]}"
        record = self.registry.get(row.model)
        aura = self.auras.write(name, record, components, source_dir=self.lab_dir / row.kind / row.id,
                                provenance={"job": row.id, "method": result.get("method"),
                                            "report": result.get("report", {})})
        if row.kind == "train_live":
            self.corrections.mark_applied(row.spec.get("correction_ids", []), row.id)
        return {"aura": aura.name, "serve_as": f"{record.id}+{aura.name}"}
