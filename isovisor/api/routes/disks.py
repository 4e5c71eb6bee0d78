"""/v1/tenants/{tenant}/disks: a tenant's persistent disks, encrypted at rest with
AES-XTS-256 under a key per disk (create with a size, list, get, delete). Deleting a disk
shreds it (isovisor.host.disks). VMs attach them by name (`disks: [{"disk": NAME}]`),
only disks of their own tenant."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from isovisor.api.errors import ERROR_RESPONSES
from isovisor.api.routes.deps import Ctx, IdempotencyKey, Svc, idempotent_create
from isovisor.api.schemas import DiskCreate, DiskOut, DiskPage
from isovisor.host.disks import DiskRecord
from isovisor.security.rbac import Scope, actions

router = APIRouter(prefix="/v1/tenants/{tenant}/disks", tags=["disks"],
                   responses=ERROR_RESPONSES)
DISK_SCOPE = "/tenants/{tenant}/disks/{disk}"
ENCRYPTION = "aes-xts-plain64"


def _x(action: str, scope: str = DISK_SCOPE) -> dict[str, object]:
    return {"x-isovisor-action": action, "x-isovisor-scope": scope}


def _out(d: DiskRecord) -> DiskOut:
    return DiskOut(tenant=d.tenant, name=d.name, size_mib=d.size >> 20, encryption=ENCRYPTION,
                   created_at=d.created_at)


@router.get("", response_model=DiskPage,
            openapi_extra=_x(actions.DISKS_READ, "/tenants/{tenant}"))
def list_disks(tenant: str, ctx: Ctx, svc: Svc, limit: int | None = Query(None, ge=1, le=200),
               page_token: str | None = Query(None, alias="pageToken", max_length=400)
               ) -> DiskPage:
    keep = ctx.authorize_list(actions.DISKS_READ, Scope.tenant(tenant))
    svc.tenants.get(tenant)
    page = svc.disks.page(tenant, limit, page_token, lambda d: keep(Scope.disk(tenant, d.name)))
    return DiskPage(items=[_out(d) for d in page.items], next_page_token=page.next_token)


@router.post("", status_code=201, response_model=DiskOut,
             openapi_extra=_x(actions.DISKS_WRITE, "/tenants/{tenant}"))
def create_disk(tenant: str, body: DiskCreate, ctx: Ctx, svc: Svc,
                idempotency_key: IdempotencyKey = None) -> Response:
    ctx.authorize(actions.DISKS_WRITE, Scope.tenant(tenant))
    return idempotent_create(ctx, svc, idempotency_key, body, lambda: _out(
        svc.disks.create(tenant, body.name, body.size_mib)))


@router.get("/{disk}", response_model=DiskOut, openapi_extra=_x(actions.DISKS_READ))
def get_disk(tenant: str, disk: str, ctx: Ctx, svc: Svc) -> DiskOut:
    ctx.authorize(actions.DISKS_READ, Scope.disk(tenant, disk))
    return _out(svc.disks.get(tenant, disk))


@router.delete("/{disk}", status_code=204, openapi_extra=_x(actions.DISKS_DELETE))
def delete_disk(tenant: str, disk: str, ctx: Ctx, svc: Svc) -> Response:
    ctx.authorize(actions.DISKS_DELETE, Scope.disk(tenant, disk))
    svc.disks.delete(tenant, disk)
    svc.access.delete_scope(Scope.disk(tenant, disk))
    return Response(status_code=204)
