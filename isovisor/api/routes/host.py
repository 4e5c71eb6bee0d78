"""/v1/whoami (any authenticated principal) and /v1/host (host-wide facts)."""

from __future__ import annotations

from fastapi import APIRouter

from isovisor import __version__
from isovisor.api.errors import ERROR_RESPONSES
from isovisor.api.routes.deps import Ctx, Svc
from isovisor.api.schemas import HostInfo, RoleAssignmentOut, WhoAmI
from isovisor.host.models import RoleAssignment
from isovisor.security.rbac import ROOT, actions

router = APIRouter(prefix="/v1", tags=["host"], responses=ERROR_RESPONSES)


@router.get("/whoami", response_model=WhoAmI, openapi_extra={"x-isovisor-action": None})
def whoami(ctx: Ctx, svc: Svc) -> WhoAmI:
    ctx.authenticated_only()
    assert ctx.peer is not None
    rows = svc.db.conn.execute("SELECT * FROM role_assignments WHERE principal = ? ORDER BY "
                               "scope, role", (ctx.principal,)).fetchall()
    return WhoAmI(principal=ctx.principal, certificate_serial=f"{ctx.peer.serial:x}",
                  certificate_not_after=ctx.peer.not_after.isoformat(), client=ctx.client,
                  assignments=[RoleAssignmentOut.of(RoleAssignment.from_row(r)) for r in rows])


@router.get("/host", response_model=HostInfo,
            openapi_extra={"x-isovisor-action": actions.HOST_READ, "x-isovisor-scope": "/"})
def host_info(ctx: Ctx, svc: Svc) -> HostInfo:
    ctx.authorize(actions.HOST_READ, ROOT)
    conn = svc.db.conn
    tenants = conn.execute("SELECT COUNT(*) FROM tenants").fetchone()[0]
    vms = conn.execute("SELECT COUNT(*) FROM vms").fetchone()[0]
    running = conn.execute("SELECT COUNT(*) FROM vms WHERE state = 'running'").fetchone()[0]
    return HostInfo(version=__version__, tenants=tenants, vms=vms, vms_running=running)
