"""/v1/tenants: the tenant set (Host Admin) and each tenant's quota."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from isovisor.api.errors import ERROR_RESPONSES
from isovisor.api.routes.deps import Ctx, IdempotencyKey, Svc, idempotent_create
from isovisor.api.schemas import QuotaBody, QuotaOut, TenantCreate, TenantOut, TenantPage
from isovisor.host.tenants import DEFAULT_QUOTA
from isovisor.security.rbac import ROOT, Scope, actions

router = APIRouter(prefix="/v1/tenants", tags=["tenants"], responses=ERROR_RESPONSES)


def _x(action: str, scope: str) -> dict[str, object]:
    return {"x-isovisor-action": action, "x-isovisor-scope": scope}


@router.get("", response_model=TenantPage, openapi_extra=_x(actions.TENANTS_READ, "/"))
def list_tenants(ctx: Ctx, svc: Svc, limit: int | None = Query(None, ge=1, le=200),
                 page_token: str | None = Query(None, alias="pageToken", max_length=400)
                 ) -> TenantPage:
    keep = ctx.authorize_list(actions.TENANTS_READ, ROOT)
    page = svc.tenants.page(limit, page_token, lambda t: keep(Scope.tenant(t.name)))
    return TenantPage(items=[TenantOut.of(t) for t in page.items],
                      next_page_token=page.next_token)


@router.post("", status_code=201, response_model=TenantOut,
             openapi_extra=_x(actions.TENANTS_WRITE, "/"))
def create_tenant(body: TenantCreate, ctx: Ctx, svc: Svc,
                  idempotency_key: IdempotencyKey = None) -> Response:
    ctx.authorize(actions.TENANTS_WRITE, ROOT)
    quota = body.quota.to_quota() if body.quota is not None else DEFAULT_QUOTA
    return idempotent_create(ctx, svc, idempotency_key, body, lambda: TenantOut.of(
        svc.tenants.create(body.name, body.description, quota)))


@router.get("/{tenant}", response_model=TenantOut,
            openapi_extra=_x(actions.TENANTS_READ, "/tenants/{tenant}"))
def get_tenant(tenant: str, ctx: Ctx, svc: Svc) -> TenantOut:
    ctx.authorize(actions.TENANTS_READ, Scope.tenant(tenant))
    return TenantOut.of(svc.tenants.get(tenant))


@router.delete("/{tenant}", status_code=204,
               openapi_extra=_x(actions.TENANTS_DELETE, "/tenants/{tenant}"))
def delete_tenant(tenant: str, ctx: Ctx, svc: Svc) -> Response:
    ctx.authorize(actions.TENANTS_DELETE, Scope.tenant(tenant))
    svc.delete_tenant(tenant)
    return Response(status_code=204)


@router.get("/{tenant}/quota", response_model=QuotaOut,
            openapi_extra=_x(actions.QUOTAS_READ, "/tenants/{tenant}"))
def get_quota(tenant: str, ctx: Ctx, svc: Svc) -> QuotaOut:
    ctx.authorize(actions.QUOTAS_READ, Scope.tenant(tenant))
    t = svc.tenants.get(tenant)
    return QuotaOut(quota=QuotaBody.of(t.quota), usage=QuotaBody.of(svc.tenants.usage(tenant)))


@router.put("/{tenant}/quota", response_model=QuotaOut,
            openapi_extra=_x(actions.QUOTAS_WRITE, "/tenants/{tenant}"))
def set_quota(tenant: str, body: QuotaBody, ctx: Ctx, svc: Svc) -> QuotaOut:
    ctx.authorize(actions.QUOTAS_WRITE, Scope.tenant(tenant))
    t = svc.tenants.set_quota(tenant, body.to_quota())
    return QuotaOut(quota=QuotaBody.of(t.quota), usage=QuotaBody.of(svc.tenants.usage(tenant)))
