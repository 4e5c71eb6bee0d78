"""One JSON error shape for every failure:

    {"error": {"code": "NotFound", "message": "VM 'web' not found", "requestId": "..."}}
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from isovisor.api.pipeline import CONTEXT_KEY, RequestContext
from isovisor.host.errors import HostError

log = logging.getLogger(__name__)

_HTTP_CODES = {400: "InvalidRequest", 401: "Unauthenticated", 403: "Forbidden",
               404: "NotFound", 405: "MethodNotAllowed", 409: "Conflict",
               413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "InvalidRequest"}


class ErrorDetail(BaseModel):
    code: str
    message: str
    requestId: str  # noqa: N815 (JSON field name)


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": desc}
    for status, desc in ((400, "invalid request"), (401, "unauthenticated"),
                         (403, "visible but not permitted"),
                         (404, "not found, or not visible to the caller"),
                         (409, "conflict, invalid state or quota exceeded"))
}


def _respond(request: Request, status: int, code: str, message: str) -> JSONResponse:
    ctx: RequestContext | None = request.scope.get(CONTEXT_KEY)
    request_id = ctx.request_id if ctx is not None else ""
    if ctx is not None:
        ctx.error_code = code
    return JSONResponse(status_code=status, content={
        "error": {"code": code, "message": message, "requestId": request_id}})


def install(app: FastAPI) -> None:
    async def host_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HostError)
        return _respond(request, exc.status, exc.code, exc.message)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else
                         str(err.get("msg", "invalid")))
        return _respond(request, 400, "InvalidRequest", "; ".join(parts) or "invalid request")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "Error")
        message = exc.detail if isinstance(exc.detail, str) else code
        return _respond(request, exc.status_code, code, message)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %r", exc, exc_info=exc)
        return _respond(request, 500, "InternalError", "internal error")

    app.add_exception_handler(HostError, host_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
