"""Skillpacks: an aura made portable. One zip holds the aura (aura.json and its component files), the
examples it was taught (dataset.jsonl), its evaluation reports (evals.json) and a compatibility
manifest (skillpack.json: the base model's id and the sha256 of its files, and the sha256 of every
file in the pack). Import verifies all of it before anything is written — every hash, no unexpected
or unlisted file, the base model present here with the same files — then creates the aura through
the store in one atomic step, so a tampered or mismatched pack leaves nothing behind."""
from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import msgspec

from server.errors import InvalidRequestError, OpenAIError
from server.lab.auras import AuraStore
from server.lab.auras.errors import AuraBaseMismatch
from server.lab.job_store import JobStore
from server.protocol.auras import Aura
from server.registry import Registry

__all__ = ["FORMAT", "SkillpackInvalid", "export_skillpack", "import_skillpack", "MAX_PACK_BYTES"]

FORMAT = "omniloader.skillpack/1"
MANIFEST = "skillpack.json"
MAX_PACK_BYTES = 1 << 30  # a zip (and what it unpacks to) larger than this is refused
# Every file a pack may hold: the manifest, the dataset and reports, the aura and its component files.
_ALLOWED = re.compile(r"^(skillpack\.json|dataset\.jsonl|evals\.json|aura/aura\.json|aura/c[0-9]{1,4}\.safetensors)$")
_EXAMPLE_FIELDS = ("prompt", "messages", "target", "rejected", "paraphrases", "neighbors", "subject", "corrections")


class SkillpackInvalid(OpenAIError):
    """A pack that is not one, was changed after export, or does not fit this server."""

    status_code = 400
    type = "invalid_request_error"
    code = "invalid_skillpack"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dataset(aura: Aura, jobs: JobStore) -> list[dict[str, Any]]:
    """The examples each job in the aura's history was taught (its spec's teaching fields)."""
    rows = []
    for entry in aura.history:
        row = jobs.get(entry.get("job", "")) if entry.get("job") else None
        if row is not None:
            rows.append({"job": row.id, "kind": row.kind, "method": entry.get("method"),
                         **{k: row.spec[k] for k in _EXAMPLE_FIELDS if k in row.spec}})
    return rows


def export_skillpack(store: AuraStore, jobs: JobStore, name: str, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Write aura `name` as `<out_dir>/<name>-<time>.zip`; returns the file and its manifest."""
    aura = store.get(name)
    store.check_files(aura)
    files: dict[str, bytes] = {"aura/aura.json": msgspec.json.format(msgspec.json.encode(aura))}
    for component in aura.components:
        if component.file is not None:
            files[f"aura/{component.file}"] = store.component_path(aura, component).read_bytes()
    files["dataset.jsonl"] = "".join(json.dumps(r) + "\n" for r in _dataset(aura, jobs)).encode()
    files["evals.json"] = json.dumps([{"job": h.get("job"), "method": h.get("method"), "report": h.get("report")}
                                      for h in aura.history], indent=1).encode()
    manifest = {"format": FORMAT, "name": aura.name, "exported_at": time.time(),
                "base": {"id": aura.base, "sha256": aura.base_sha256},
                "files": {path: _sha256(data) for path, data in sorted(files.items())}}
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{aura.name}-{time.strftime('%Y%m%d-%H%M%S')}.zip"
    with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".part", delete=False) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as pack:
            pack.writestr(MANIFEST, json.dumps(manifest, indent=1))
            for path, data in sorted(files.items()):
                pack.writestr(path, data)
    Path(tmp.name).replace(target)  # atomic: a reader never sees half a pack
    return target, manifest


def _read_pack(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and files of a pack, every hash and name checked; SkillpackInvalid otherwise."""
    if len(data) > MAX_PACK_BYTES:
        raise SkillpackInvalid(f"The skillpack is over {MAX_PACK_BYTES >> 20} MiB.")
    try:
        pack = zipfile.ZipFile(io.BytesIO(data))
        infos = pack.infolist()
        if sum(i.file_size for i in infos) > MAX_PACK_BYTES or len(infos) > 10_000:
            raise SkillpackInvalid("The skillpack unpacks to too much.")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names) or (bad := [n for n in names if not _ALLOWED.match(n)]):
            raise SkillpackInvalid(f"The skillpack holds files it must not: {sorted(set(bad or names))[:5]}.")
        files = {n: pack.read(n) for n in names}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, RuntimeError) as exc:
        raise SkillpackInvalid(f"Not a skillpack (zip): {exc}") from None
    try:
        manifest = json.loads(files.pop(MANIFEST))
        listed = dict(manifest["files"])
        base = manifest["base"]
    except (KeyError, ValueError, TypeError, AttributeError):
        raise SkillpackInvalid(f"The skillpack has no valid {MANIFEST}.") from None
    if manifest.get("format") != FORMAT:
        raise SkillpackInvalid(f"Unknown skillpack format `{manifest.get('format')}` (this server reads {FORMAT}).")
    if set(listed) != set(files):
        raise SkillpackInvalid(f"The skillpack's files do not match its manifest (missing or extra: "
                               f"{sorted(set(listed) ^ set(files))[:5]}).")
    for path, content in files.items():
        if _sha256(content) != listed[path]:
            raise SkillpackInvalid(f"`{path}` does not hash to what the skillpack's manifest says: it was changed "
                                   "after export.")
    if not isinstance(base, dict) or not isinstance(base.get("id"), str):
        raise SkillpackInvalid(f"{MANIFEST} names no base model.")
    return manifest, files


def import_skillpack(store: AuraStore, registry: Registry, data: bytes, name: str | None = None) -> Aura:
    """Verify a pack, then create its aura (as `name`, or the pack's own name)."""
    manifest, files = _read_pack(data)
    try:
        aura = msgspec.json.decode(files["aura/aura.json"], type=Aura)
    except (KeyError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SkillpackInvalid(f"The skillpack's aura.json is not an aura: {exc}") from None
    base = manifest["base"]
    if aura.base != base["id"] or aura.base_sha256 != base.get("sha256"):
        raise SkillpackInvalid("aura.json and skillpack.json name different base models.")
    record = registry.get(base["id"]) if base["id"] in {r.id for r in registry.usable()} else None
    if record is None:
        raise InvalidRequestError(f"The skillpack was made on model `{base['id']}`, which this server does not "
                                  "have.", param="base")
    here = store.base_sha256(record)
    if base.get("sha256") != here:
        raise AuraBaseMismatch(f"The skillpack was made on `{base['id']}` with files hashing to "
                               f"{str(base.get('sha256'))[:12]}…, but this server's `{record.id}` hashes to "
                               f"{str(here)[:12]}…: it would not act the same.", param="base")
    with tempfile.TemporaryDirectory(prefix=".skillpack-", dir=store.root if store.root.is_dir() else None) as tmp:
        parts = []
        for component in aura.components:
            src = None
            if component.file is not None:
                content = files.get(f"aura/{component.file}")
                if content is None or _sha256(content) != component.sha256:
                    raise SkillpackInvalid(f"Component {component.id}'s file does not match its sha256 in aura.json.")
                src = Path(tmp) / component.file
                src.write_bytes(content)
            parts.append((component, src))
        entry = {"imported_from": manifest.get("name"), "exported_at": manifest.get("exported_at"),
                 "history": aura.history, "at": time.time()}  # the pack's own history, kept whole
        return store.create(name or aura.name, aura.base, aura.base_sha256, parts, entry)
