"""/lab/skillpacks: export an aura as one portable zip, list and download packs, import one (the
zip as the request body) — verified whole before anything is written (server/lab/skillpacks.py)."""
from __future__ import annotations

import hashlib
import re

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery
from litestar.response import File

from server.controllers.auth import require_api_key
from server.errors import JobNotFound, decode_body
from server.lab.service import Lab
from server.lab.skillpacks import MAX_PACK_BYTES, export_skillpack, import_skillpack
from server.protocol.auras import AuraObject
from server.protocol.skillpacks import ExportRequest, Skillpack, SkillpackList

__all__ = ["SkillpacksController", "SKILLPACKS_DIR"]

SKILLPACKS_DIR = "skillpacks"  # under the lab dir
URL = "/lab/skillpacks/"
_PACK_FILE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}-[0-9]{8}-[0-9]{6}\.zip$")


def _described(path, manifest=None) -> Skillpack:
    data = path.read_bytes()
    return Skillpack(file=path.name, url=URL + path.name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                     manifest=manifest)


class SkillpacksController(Controller):
    path = "/lab/skillpacks"
    guards = [require_api_key]

    @post("/export", status_code=200, sync_to_thread=True)
    def export(self, lab: NamedDependency[Lab], body: bytes) -> Skillpack:
        req: ExportRequest = decode_body(body, ExportRequest)
        path, manifest = export_skillpack(lab.auras, lab.store, req.aura, lab.lab_dir / SKILLPACKS_DIR)
        return _described(path, manifest)

    @post("/import", status_code=201, sync_to_thread=True, request_max_body_size=MAX_PACK_BYTES)
    def import_pack(self, lab: NamedDependency[Lab], body: bytes, name: FromQuery[str | None] = None) -> AuraObject:
        """The zip is the body (`curl --data-binary @pack.zip`); `?name=` imports it under another name."""
        return AuraObject.of(import_skillpack(lab.auras, lab.registry, body, name))

    @get("/", sync_to_thread=True)
    def list_packs(self, lab: NamedDependency[Lab]) -> SkillpackList:
        folder = lab.lab_dir / SKILLPACKS_DIR
        found = sorted(p for p in folder.glob("*.zip") if _PACK_FILE.match(p.name)) if folder.is_dir() else []
        return SkillpackList(data=[_described(p) for p in found])

    @get("/{file:str}", sync_to_thread=True)
    def download(self, lab: NamedDependency[Lab], file: FromPath[str]) -> File:
        path = lab.lab_dir / SKILLPACKS_DIR / file
        if not _PACK_FILE.match(file) or path.is_symlink() or not path.is_file():
            raise JobNotFound(f"No skillpack `{file}`: GET /lab/skillpacks lists them.", param="file")
        return File(path, media_type="application/zip", filename=file)
