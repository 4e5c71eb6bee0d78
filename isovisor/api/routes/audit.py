"""/v1/audit: the host's audit log, read-only.

Only `audit/read` at `/` opens it: the built-in Auditor role assigned at `/`, and Host
Admin. There is no route that writes, changes or deletes audit entries; the files belong
to the daemon's user alone (isovisor.security.audit)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from isovisor.api.errors import ERROR_RESPONSES
from isovisor.api.routes.deps import Ctx, Svc
from isovisor.api.schemas import Model
from isovisor.host.errors import InvalidRequest
from isovisor.security.audit.export import read_page
from isovisor.security.audit.hooks import AUDIT_DIR_NAME
from isovisor.security.rbac import ROOT, actions

router = APIRouter(prefix="/v1", tags=["audit"], responses=ERROR_RESPONSES)


class AuditEntryOut(Model):
    seq: int
    ts: str
    type: str  # genesis | record | checkpoint
    kind: str
    data: dict[str, Any] | None
    sha256: str
    prev: str


class AuditPage(Model):
    items: list[AuditEntryOut]
    next_page_token: str | None


@router.get("/audit", response_model=AuditPage,
            openapi_extra={"x-isovisor-action": actions.AUDIT_READ, "x-isovisor-scope": "/"})
def read_audit(ctx: Ctx, svc: Svc, limit: int = Query(100, ge=1, le=1000),
               page_token: str | None = Query(None, alias="pageToken", max_length=20),
               kind: str | None = Query(None, max_length=64,
                                        description="only records of this kind or below it, "
                                        "e.g. api.request or security")) -> AuditPage:
    ctx.authorize(actions.AUDIT_READ, ROOT)
    if page_token is not None and not page_token.isdigit():
        raise InvalidRequest("pageToken is not one this API returned")
    after = int(page_token) if page_token is not None else -1
    entries, nxt = read_page(svc.state_dir / AUDIT_DIR_NAME, after, limit, kind)
    return AuditPage(items=[AuditEntryOut(
        seq=e.seq, ts=e.ts, type=e.type.value, kind=e.kind, data=e.fields.get("data"),
        sha256=e.hash, prev=e.prev) for e in entries],
        next_page_token=None if nxt is None else str(nxt))
