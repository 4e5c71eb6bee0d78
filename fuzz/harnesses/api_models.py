"""The API's request models (every requestBody schema the OpenAPI document names, found
from the app, not listed here), parsed from JSON as FastAPI parses bodies. Oracles: only
ValidationError; an accepted body round-trips to the same model."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from fuzz.data import Data

COVERS = ("api:POST /v1/tenants", "api:PUT /v1/tenants/{tenant}/quota",
          "api:POST /v1/tenants/{tenant}/vms", "api:POST /v1/roleAssignments",
          "api:POST /v1/roleDefinitions", "api:POST /v1/tenants/{tenant}/networks")
_models: list[type[BaseModel]] = []
FRAGMENTS = (b'{"name":"a"', b',"kernel":"k"', b',"vcpus":', b',"memoryMiB":', b"64", b"-1",
             b"1e9", b"true", b"null", b'"\\u0000"', b'"' + b"x" * 70 + b'"', b"}", b"[",
             b"]", b',"scope":"/tenants/a"', b',"actions":["*"]', b',"principal":"p"',
             b',"role":"Owner"', b',"maxVcpus":1,"maxMemoryMiB":1,"maxVms":1',
             b',"cidr":"10.8.0.0/24"', b',"nics":[{"network":"lan"}]')


def setup() -> None:
    from isovisor.api import schemas
    from isovisor.security.surface.api import build_app

    doc = build_app().openapi()
    names = set()
    for item in doc["paths"].values():
        for op in item.values():
            for content in op.get("requestBody", {}).get("content", {}).values():
                ref = content.get("schema", {}).get("$ref")
                if ref:
                    names.add(ref.rsplit("/", 1)[-1])
    _models.extend(getattr(schemas, n) for n in sorted(names))


def one_input(data: bytes) -> None:
    if not _models:
        setup()
    d = Data(data)
    model = _models[d.u8() % len(_models)]
    if d.flag():
        raw = b"".join(FRAGMENTS[d.u8() % len(FRAGMENTS)] for _ in range(d.u8() % 12))
    else:
        raw = d.rest()
    try:
        obj: Any = model.model_validate_json(raw)
    except ValidationError:
        return
    again = model.model_validate_json(obj.model_dump_json(by_alias=True))
    assert again == obj, f"{model.__name__} does not round-trip"
