"""/lab/auras: the stored auras (list, show, compose, delete). Serving one is `model: "base+aura"`
on any endpoint that takes a model (server/lab/auras/overlay.py)."""
from __future__ import annotations

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from server.controllers.auth import require_api_key
from server.errors import InvalidRequestError, decode_body
from server.lab.auras import AuraNotFound
from server.lab.service import Lab
from server.protocol.auras import AuraDeleted, AuraList, AuraObject, ComposeRequest

__all__ = ["AurasController"]


class AurasController(Controller):
    path = "/lab/auras"
    guards = [require_api_key]

    @get("/", sync_to_thread=True)
    def list_auras(self, lab: NamedDependency[Lab]) -> AuraList:
        return AuraList(data=[AuraObject.of(a) for a in lab.auras.list()])

    @get("/{name:str}", sync_to_thread=True)
    def show(self, lab: NamedDependency[Lab], name: FromPath[str]) -> AuraObject:
        return AuraObject.of(lab.auras.get(name))

    @post("/", status_code=201, sync_to_thread=True)
    def compose(self, lab: NamedDependency[Lab], body: bytes) -> AuraObject:
        """{name, base?, auras?: [name...], components?: [{aura, id, weight?} | {kind, text|bias, weight?}]}"""
        req: ComposeRequest = decode_body(body, ComposeRequest)
        picks = [(a, None, None) for a in req.auras]
        inline = []
        for i, item in enumerate(req.components):
            if not isinstance(item, dict):
                raise InvalidRequestError("Each component is an object.", param=f"components[{i}]")
            if "aura" in item:
                extra = set(item) - {"aura", "id", "weight"}
                if extra or not isinstance(item.get("id"), str):
                    raise InvalidRequestError("A component taken from an aura is {aura, id, weight?}.",
                                              param=f"components[{i}]")
                weight = item.get("weight")
                if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
                    raise InvalidRequestError("`weight` must be a number.", param=f"components[{i}].weight")
                picks.append((item["aura"], item["id"], None if weight is None else float(weight)))
            else:
                inline.append(item)
        base = lab.registry.resolve(req.base) if req.base else None
        return AuraObject.of(lab.auras.compose(req.name, picks, inline, base))

    @delete("/{name:str}", status_code=200, sync_to_thread=True)
    def remove(self, lab: NamedDependency[Lab], name: FromPath[str]) -> AuraDeleted:
        if lab.auras.folder(name) is None:
            raise AuraNotFound(name)
        return AuraDeleted(name=lab.auras.delete(name).name)
