"""Snapshots and rollback of a model's weights.

A snapshot records a content hash of every tensor in the model's state dict (and of its tokenizer
and chat template, which carries the default system prompt) and keeps each distinct tensor once in
a content-addressed blob store (`<store_dir>/blobs/<sha256>.safetensors`), so a second snapshot of
mostly unchanged weights costs almost nothing. Rollback copies back exactly the tensors whose hash
changed and re-hashes everything: the result says whether the weights are identical to the snapshot."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated

import msgspec
import torch

from lab_engines.context import JobContext
from lab_engines.limits import ShortText
from lab_engines.model_access import ModelView

__all__ = ["RollbackSpec", "SnapshotSpec", "run_rollback", "run_snapshot", "tensor_digest", "weight_digests"]

MANIFEST = "snapshot.json"
DIGEST = re.compile(r"[0-9a-f]{64}")  # a blob's name: the sha256 of its tensor


class SnapshotSpec(msgspec.Struct, kw_only=True):
    note: ShortText = ""


class RollbackSpec(msgspec.Struct, kw_only=True):
    snapshot: Annotated[str, msgspec.Meta(max_length=100)]  # the snapshot's id (the id of the job that took it)
    snapshot_dir: str = ""  # filled in by the server (a request may not set it): where the snapshot's manifest is


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 over dtype, shape and the raw bytes: equal digests mean bit-identical tensors."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    if t.numel():
        digest.update(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
    return digest.hexdigest()


def _tensors(view: ModelView) -> dict[str, torch.Tensor]:
    return dict(view.model.state_dict(keep_vars=True))


def weight_digests(view: ModelView, ctx: JobContext | None = None, span: tuple[float, float] = (0.0, 1.0)
                   ) -> dict[str, str]:
    tensors = _tensors(view)
    digests = {}
    for i, (name, tensor) in enumerate(tensors.items()):
        if ctx is not None:
            ctx.check()
            ctx.progress(span[0] + (span[1] - span[0]) * i / len(tensors), f"hashing {name}")
        digests[name] = tensor_digest(tensor)
    return digests


def _text_digest(text: str | None) -> str:
    return hashlib.sha256((text or "").encode()).hexdigest()


def tokenizer_digests(view: ModelView) -> dict[str, str]:
    tok = view.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    return {"tokenizer": _text_digest(vocab), "chat_template": _text_digest(getattr(tok, "chat_template", None))}


def _combined(digests: dict[str, str]) -> str:
    return _text_digest("\n".join(f"{name}={d}" for name, d in sorted(digests.items())))


def _blob(store_dir: Path, digest: str) -> Path:
    return store_dir / "blobs" / f"{digest}.safetensors"


def run_snapshot(view: ModelView, spec: SnapshotSpec, ctx: JobContext) -> dict:
    from safetensors.torch import save_file

    digests = weight_digests(view, ctx, (0.0, 0.5))
    tensors = _tensors(view)
    new_bytes = total = 0
    for i, (name, digest) in enumerate(digests.items()):
        ctx.check()
        ctx.progress(0.5 + 0.5 * i / len(digests), f"storing {name}")
        tensor = tensors[name].detach().to("cpu").contiguous()
        total += tensor.numel() * tensor.element_size()
        path = _blob(ctx.store_dir, digest)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"tensor": tensor.clone()}, str(tmp))  # clone: tied weights share storage
        os.replace(tmp, path)  # atomic: a blob is whole or absent
        new_bytes += tensor.numel() * tensor.element_size()
    manifest = {"tensors": digests, "weights_digest": _combined(digests), **tokenizer_digests(view),
                "n_tensors": len(digests), "bytes": total, "note": spec.note}
    (ctx.artifact_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    ctx.progress(1.0, "snapshot stored")
    return {"weights_digest": manifest["weights_digest"], "tokenizer_digest": manifest["tokenizer"],
            "chat_template_digest": manifest["chat_template"], "n_tensors": len(digests), "bytes": total,
            "new_bytes": new_bytes, "note": spec.note, "artifacts": [MANIFEST]}


def _planned_restores(view: ModelView, manifest: dict, current: dict[str, str], store_dir: Path) -> list[str]:
    """Which tensors to copy back; checks everything first so a rollback never stops half-way."""
    wanted = manifest["tensors"]
    if set(wanted) != set(current):
        missing, extra = sorted(set(wanted) - set(current)), sorted(set(current) - set(wanted))
        raise ValueError(f"The snapshot is of a model with other tensors (missing {missing[:3]}, extra {extra[:3]}).")
    changed = [name for name in wanted if wanted[name] != current[name]]
    absent = [name for name in changed if not _blob(store_dir, wanted[name]).exists()]
    if absent:
        raise ValueError(f"The snapshot's stored tensors are missing for {absent[:3]}: it cannot be restored.")
    return changed


def run_rollback(view: ModelView, spec: RollbackSpec, ctx: JobContext) -> dict:
    from safetensors.torch import load_file

    folder = Path(spec.snapshot_dir).resolve()
    path = (folder / MANIFEST).resolve()
    if path.parent != folder or not path.is_file():  # a manifest symlinked out of its folder is no manifest
        raise ValueError(f"Snapshot `{spec.snapshot}` has no manifest in its folder.")
    manifest = json.loads(path.read_text())
    if not all(isinstance(d, str) and DIGEST.fullmatch(d) for d in manifest.get("tensors", {}).values()):
        raise ValueError(f"Snapshot `{spec.snapshot}` has a damaged manifest: a tensor digest is not a sha256.")
    current = weight_digests(view, ctx, (0.0, 0.4))
    changed = _planned_restores(view, manifest, current, ctx.store_dir)
    tensors = _tensors(view)
    with torch.no_grad():
        for i, name in enumerate(changed):
            ctx.progress(0.4 + 0.2 * i / max(len(changed), 1), f"restoring {name}")
            saved = load_file(str(_blob(ctx.store_dir, manifest["tensors"][name])))["tensor"]
            tensors[name].copy_(saved.to(tensors[name].device))
    after = weight_digests(view, None)
    ctx.progress(1.0, "verified")
    identical = after == manifest["tensors"]
    tokenizer_now = tokenizer_digests(view)
    return {"snapshot": spec.snapshot, "restored": changed, "n_restored": len(changed), "identical": identical,
            "weights_digest": _combined(after), "tokenizer_matches": tokenizer_now["tokenizer"] == manifest["tokenizer"],
            "chat_template_matches": tokenizer_now["chat_template"] == manifest["chat_template"], "artifacts": []}
