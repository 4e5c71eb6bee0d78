"""What every route needs: the request context, the host service, idempotent creates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from isovisor.api.pipeline import CONTEXT_KEY, RequestContext
from isovisor.host.errors import HostError
from isovisor.host.idempotency import fingerprint
from isovisor.host.service import HostService


def _context(request: Request) -> RequestContext:
    ctx: RequestContext = request.scope[CONTEXT_KEY]
    return ctx


def _service(request: Request) -> HostService:
    svc: HostService = request.app.state.service
    return svc


Ctx = Annotated[RequestContext, Depends(_context)]
Svc = Annotated[HostService, Depends(_service)]
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", max_length=128,
           description="retrying a create with the same key returns the first answer"),
]


def json_response(model: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(status_code=status, content=model.model_dump(by_alias=True, mode="json"))


def idempotent_create(ctx: RequestContext, svc: HostService, key: str | None,
                      body: BaseModel, create: Callable[[], BaseModel]) -> JSONResponse:
    """Run `create` once per (principal, key); replay its 201 answer on retries. Call
    after authorization, so that a replay needs the same permission."""
    if key is None:
        return json_response(create(), 201)
    fp = fingerprint(ctx.method, ctx.path, body.model_dump_json(by_alias=True).encode())
    stored = svc.idempotency.claim(ctx.principal, key, fp)
    if stored is not None:
        response = JSONResponse(status_code=stored.status, content=stored.body)
        response.headers["Idempotent-Replayed"] = "true"
        return response
    try:
        result = create()
    except HostError:
        svc.idempotency.release(ctx.principal, key)
        raise
    content = result.model_dump(by_alias=True, mode="json")
    svc.idempotency.complete(ctx.principal, key, 201, content)
    return JSONResponse(status_code=201, content=content)
