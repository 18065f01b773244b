"""The aura store: `<lab dir>/auras/<name>/aura.json` and its component files (c1.safetensors, ...).

Paths: a name is checked against `[a-z0-9][a-z0-9_-]{0,63}` before it is joined to anything, an aura's
folder must be `<store>/<name>` itself (no symlink), and every component file a stored aura.json
names must be one the store named (`c<n>.safetensors`) resolving inside that folder.

Writes are atomic: a new aura is built in a staging folder (`.staging-…`) and renamed into place;
adding to an aura copies the new files under ids aura.json does not reference yet, then replaces
aura.json (temp file + rename). A crash leaves the old aura or the new one, and at worst an orphan
file or a dot-folder that nothing reads. Delete renames the folder away before removing it.

Loading an aura for a request (`verified`) checks its base (same model id, and the model's files
still hash to `base_sha256`) and every component file's sha256 (re-hashed only when the file's
inode, size, mtime or ctime changed)."""
from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

from server.lab.auras.components import MAX_COMPONENTS, check_component, check_file, check_name, file_name, is_name, \
    new_component, COMPONENT_FILE
from server.lab.auras.errors import AuraBaseChanged, AuraBaseMismatch, AuraCorrupt, AuraExists, AuraHashMismatch, \
    AuraNotFound
from server.lab.auras.files import BaseHashes, FileHashes, copy_hashed, write_atomic
from server.errors import InvalidRequestError
from server.protocol.auras import FILE_KINDS, Aura, Component
from server.registry import ModelRecord

__all__ = ["AURA_FILE", "AuraStore"]

log = logging.getLogger("omniloader.auras")

AURA_FILE = "aura.json"
BASE_HASHES = ".base-hashes.json"


class AuraStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.hashes = FileHashes()
        self.bases = BaseHashes(self.root / BASE_HASHES)
        self._lock = threading.RLock()  # one writer at a time in this process
        self._parsed: dict[str, tuple[tuple, Aura]] = {}

    # --- paths ------------------------------------------------------------------------------
    def folder(self, name: str) -> Path | None:
        """<store>/<name> if `name` is an aura name whose folder exists there itself (no symlink), else None."""
        if not is_name(name):
            return None
        folder = self.root / name
        if folder.is_symlink() or not folder.is_dir() or folder.resolve() != self.root.resolve() / name:
            return None
        return folder

    def component_path(self, aura: Aura, component: Component) -> Path:
        """The file of a file component, confined to the aura's folder."""
        folder = self.folder(aura.name)
        if folder is None or component.file is None or COMPONENT_FILE.fullmatch(component.file) is None:
            raise AuraCorrupt(f"Aura `{aura.name}`: component {component.id} names no file the store wrote.")
        path = folder / component.file
        if path.is_symlink() or not path.is_file():
            raise AuraCorrupt(f"Aura `{aura.name}`: component {component.id}'s file {component.file} is missing.")
        return path

    # --- reading ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if is_name(p.name) and self.folder(p.name) is not None)

    def list(self) -> list[Aura]:
        """Every readable aura (an unreadable one is logged and left out)."""
        found = []
        for name in self.names():
            try:
                found.append(self.get(name))
            except (AuraNotFound, AuraCorrupt) as exc:
                log.warning("aura %s skipped: %s", name, exc.message)
        return found

    def get(self, name: str, *, model: str | None = None) -> Aura:
        """The aura as stored (parsed once per version of its aura.json). 404 if there is none."""
        folder = self.folder(name)
        path = folder / AURA_FILE if folder is not None else None
        if path is None or path.is_symlink() or not path.is_file():
            raise AuraNotFound(name, model=model)
        st = path.stat()
        sig = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._parsed.get(name)
        if cached is not None and cached[0] == sig:
            return cached[1]
        try:
            aura = msgspec.json.decode(path.read_bytes(), type=Aura)
            if aura.name != name:
                raise ValueError(f"it names itself `{aura.name}`")
            for c in aura.components:
                check_component(c, f"components[{c.id}]")
        except (OSError, ValueError, msgspec.DecodeError) as exc:
            raise AuraCorrupt(f"Aura `{name}`: {AURA_FILE} is unreadable: {exc}", param=None) from None
        self._parsed[name] = (sig, aura)
        return aura

    def base_sha256(self, record: ModelRecord) -> str | None:
        return self.bases.sha256(record)

    def verified(self, name: str, record: ModelRecord, *, model: str | None = None) -> Aura:
        """The aura, checked for serving on `record`: 404 unknown, 400 made on another model, 409 its base
        model's files or one of its component files changed since it was written."""
        aura = self.get(name, model=model)
        if aura.base != record.id:
            raise AuraBaseMismatch(f"Aura `{name}` was made on model `{aura.base}`, not `{record.id}`: request "
                                   f"`{aura.base}+{name}`.", param="model")
        if aura.base_sha256 is not None:
            current = self.base_sha256(record)
            if current is not None and current != aura.base_sha256:
                raise AuraBaseChanged(f"Aura `{name}` was made on the files of `{record.id}` that hashed to "
                                      f"{aura.base_sha256[:12]}…; they now hash to {current[:12]}…, so it is refused "
                                      "(make it again on the new files).", param="model")
        self.check_files(aura)
        return aura

    def check_files(self, aura: Aura) -> None:
        for c in aura.components:
            if c.kind not in FILE_KINDS:
                continue
            path = self.component_path(aura, c)
            actual = self.hashes.sha256(path)
            if actual != c.sha256:
                raise AuraHashMismatch(f"Aura `{aura.name}`: component {c.id} ({c.file}) hashes to {actual[:12]}…, not "
                                       f"the {str(c.sha256)[:12]}… recorded when it was written; the aura is refused "
                                       "(the file was changed or damaged).", param="model")

    # --- writing ----------------------------------------------------------------------------
    def write(self, name: str, base_record: ModelRecord, components: list[dict[str, Any]], source_dir: Path,
              provenance: dict[str, Any] | None = None) -> Aura:
        """Write a finished job's components into aura `name` (created, or appended to when it exists and was
        made on the same base files). `components` are the engine's dicts (teach-design.md); a file
        component's `file` is a path relative to `source_dir` (the job's folder), copied in and hashed.
        `provenance` ({job, method, report, ...}) becomes a history entry; its `job` each component's
        source_job. Raises ValueError (bad component or name), AuraBaseMismatch / AuraBaseChanged."""
        check_name(name)
        provenance = dict(provenance or {})
        source_dir = Path(source_dir).resolve()
        checked = []
        for i, data in enumerate(components):
            c = new_component(data, "c0", f"components[{i}]")
            src = None
            if c.kind in FILE_KINDS:
                src = (source_dir / c.file).resolve()
                if source_dir not in src.parents or not src.is_file():
                    raise ValueError(f"`components[{i}].file` {c.file} is not a file inside {source_dir}.")
                check_file(c, src, f"components[{i}]")
            checked.append((msgspec.structs.replace(c, source_job=c.source_job or provenance.get("job")), src))
        entry = {**provenance, "at": time.time()}
        with self._lock:
            return self._store(name, base_record.id, self.base_sha256(base_record), checked, entry, append=True)

    def create(self, name: str, base: str, base_sha256: str | None, parts: list[tuple[Component, Path | None]],
               entry: dict[str, Any]) -> Aura:
        """A new aura from checked components (files already verified); 409 if the name is taken."""
        check_name(name)
        with self._lock:
            return self._store(name, base, base_sha256, parts, entry, append=False)

    def _store(self, name: str, base: str, base_sha256: str | None, parts: list[tuple[Component, Path | None]],
               entry: dict[str, Any], *, append: bool) -> Aura:
        self.root.mkdir(parents=True, exist_ok=True)
        existing = self.get(name) if self.folder(name) is not None else None
        if existing is not None and not append:
            raise AuraExists(f"Aura `{name}` exists already: DELETE /lab/auras/{name} first, or pick another name.",
                             param="name")
        if existing is None and (self.root / name).exists():
            raise AuraExists(f"`{name}` in {self.root} is not an aura folder the store can write to.", param="name")
        if existing is not None:
            self._check_same_base(existing, base, base_sha256)
        if len(parts) + (len(existing.components) if existing else 0) > MAX_COMPONENTS:
            raise ValueError(f"An aura holds at most {MAX_COMPONENTS} components.")
        now = time.time()
        start = 1 + max((int(c.id[1:]) for c in existing.components), default=0) if existing else 1
        folder = self.root / name if existing else self.root / f".staging-{name}-{secrets.token_hex(4)}"
        folder.mkdir(exist_ok=True)
        added: list[Component] = []
        try:
            for n, (c, src) in enumerate(parts, start):
                cid = f"c{n}"
                c = msgspec.structs.replace(c, id=cid)
                if src is not None:
                    c = msgspec.structs.replace(c, file=file_name(cid), sha256=copy_hashed(src, folder / file_name(cid)))
                added.append(c)
            aura = Aura(name=name, base=base, base_sha256=base_sha256, created_at=existing.created_at if existing
                        else now, updated_at=now, components=[*(existing.components if existing else []), *added],
                        history=[*(existing.history if existing else []), entry])
            write_atomic(folder / AURA_FILE, msgspec.json.format(msgspec.json.encode(aura)))
            if existing is None:
                try:
                    os.rename(folder, self.root / name)
                except OSError:
                    raise AuraExists(f"Aura `{name}` was created meanwhile.", param="name") from None
        except BaseException:
            if existing is None:
                shutil.rmtree(folder, ignore_errors=True)
            else:  # files aura.json never referenced
                for c in added:
                    if c.file is not None:
                        (folder / c.file).unlink(missing_ok=True)
            raise
        log.info("aura %s: %s %d component(s) on %s", name, "added" if existing else "created", len(added), base)
        return aura

    @staticmethod
    def _check_same_base(aura: Aura, base: str, base_sha256: str | None) -> None:
        if aura.base != base:
            raise AuraBaseMismatch(f"Aura `{aura.name}` is made on `{aura.base}`; components made on `{base}` cannot "
                                   "join it (pick another aura name).", param="aura")
        if aura.base_sha256 and base_sha256 and aura.base_sha256 != base_sha256:
            raise AuraBaseChanged(f"Aura `{aura.name}` was made on other files of `{base}` (sha256 "
                                  f"{aura.base_sha256[:12]}…, now {base_sha256[:12]}…); write to a new aura.",
                                  param="aura")

    def delete(self, name: str) -> Aura:
        with self._lock:
            aura = self.get(name)
            trash = self.root / f".trash-{name}-{secrets.token_hex(4)}"
            os.rename(self.root / name, trash)  # gone for readers at once
            shutil.rmtree(trash, ignore_errors=True)
            self._parsed.pop(name, None)
        log.info("aura %s deleted", name)
        return aura

    # --- composing (POST /lab/auras) ---------------------------------------------------------
    def compose(self, name: str, picks: list[tuple[str, str | None, float | None]], inline: list[dict[str, Any]],
                base_record: ModelRecord | None) -> Aura:
        """A new aura from other auras' components — picks are (aura, component id or None for all of them,
        weight or None to keep it) — plus inline prompt_delta / token_bias dicts. Every source must be made
        on the same base; their files are verified before they are copied."""
        try:
            check_name(name)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="name") from None
        sources: dict[str, Aura] = {}
        parts: list[tuple[Component, Path | None]] = []
        for i, (aura_name, cid, weight) in enumerate(picks):
            if aura_name not in sources:
                try:
                    sources[aura_name] = self.get(aura_name)
                except AuraNotFound:
                    raise AuraNotFound(str(aura_name), param="auras") from None
                self.check_files(sources[aura_name])
            source = sources[aura_name]
            chosen = [c for c in source.components if cid is None or c.id == cid]
            if cid is not None and not chosen:
                raise InvalidRequestError(f"Aura `{aura_name}` has no component `{cid}`.", param=f"components[{i}].id")
            for c in chosen:
                if weight is not None:
                    try:
                        c = check_component(msgspec.structs.replace(c, weight=weight), f"components[{i}]")
                    except ValueError as exc:
                        raise InvalidRequestError(str(exc), param=f"components[{i}].weight") from None
                parts.append((c, self.component_path(source, c) if c.kind in FILE_KINDS else None))
        bases = {(a.base, a.base_sha256) for a in sources.values()}
        if len({b for b, _s in bases}) > 1:
            raise AuraBaseMismatch(f"The auras are made on different models ({', '.join(sorted(b for b, _ in bases))}); "
                                   "an aura has one base.", param="auras")
        if len(bases) > 1:
            raise AuraBaseChanged("The auras are made on different files of the same model.", param="auras")
        base, base_sha = next(iter(bases)) if bases else (None, None)
        if base_record is not None:
            if base is not None and base != base_record.id:
                raise AuraBaseMismatch(f"The auras are made on `{base}`, not `{base_record.id}`.", param="base")
            base, base_sha = base_record.id, base_sha if base is not None else self.base_sha256(base_record)
        if base is None:
            raise InvalidRequestError("`base` is required when no aura is named: the model the aura is for.",
                                      param="base")
        for i, data in enumerate(inline):
            try:
                c = new_component(data, "c0", f"components[{i}]")
            except ValueError as exc:
                raise InvalidRequestError(str(exc), param=f"components[{i}]") from None
            if c.kind in FILE_KINDS:
                raise InvalidRequestError(f"A {c.kind} component cannot be given inline: name it from an aura "
                                          "({aura, id}).", param=f"components[{i}]")
            parts.append((c, None))
        if not parts:
            raise InvalidRequestError("Nothing to compose: give `auras` or `components`.", param="components")
        picked = [{"aura": a, "id": c} for a, c, _w in picks]
        return self.create(name, base, base_sha, parts, {"composed_from": picked, "at": time.time()})
