"""/v1/tenants/{tenant}/networks: a tenant's virtual networks (create with a CIDR, list,
get, delete). Each is an L2 segment of its own on the host (isovisor.host.network); VMs
join one through a NIC in their spec (`nics: [{"network": NAME}]`)."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from isovisor.api.errors import ERROR_RESPONSES
from isovisor.api.routes.deps import Ctx, IdempotencyKey, Svc, idempotent_create
from isovisor.api.schemas import NetworkCreate, NetworkOut, NetworkPage
from isovisor.host.network.store import Network
from isovisor.security.rbac import Scope, actions

router = APIRouter(prefix="/v1/tenants/{tenant}/networks", tags=["networks"],
                   responses=ERROR_RESPONSES)
NETWORK_SCOPE = "/tenants/{tenant}/networks/{network}"


def _x(action: str, scope: str = NETWORK_SCOPE) -> dict[str, object]:
    return {"x-isovisor-action": action, "x-isovisor-scope": scope}


def _out(n: Network) -> NetworkOut:
    return NetworkOut(tenant=n.tenant, name=n.name, cidr=n.cidr, gateway=n.gateway,
                      created_at=n.created_at)


@router.get("", response_model=NetworkPage,
            openapi_extra=_x(actions.NETWORKS_READ, "/tenants/{tenant}"))
def list_networks(tenant: str, ctx: Ctx, svc: Svc,
                  limit: int | None = Query(None, ge=1, le=200),
                  page_token: str | None = Query(None, alias="pageToken", max_length=400)
                  ) -> NetworkPage:
    keep = ctx.authorize_list(actions.NETWORKS_READ, Scope.tenant(tenant))
    svc.tenants.get(tenant)
    page = svc.networks.store.page(tenant, limit, page_token,
                                   lambda n: keep(Scope.network(tenant, n.name)))
    return NetworkPage(items=[_out(n) for n in page.items], next_page_token=page.next_token)


@router.post("", status_code=201, response_model=NetworkOut,
             openapi_extra=_x(actions.NETWORKS_WRITE, "/tenants/{tenant}"))
def create_network(tenant: str, body: NetworkCreate, ctx: Ctx, svc: Svc,
                   idempotency_key: IdempotencyKey = None) -> Response:
    ctx.authorize(actions.NETWORKS_WRITE, Scope.tenant(tenant))
    return idempotent_create(ctx, svc, idempotency_key, body, lambda: _out(
        svc.networks.create(tenant, body.name, body.cidr)))


@router.get("/{network}", response_model=NetworkOut, openapi_extra=_x(actions.NETWORKS_READ))
def get_network(tenant: str, network: str, ctx: Ctx, svc: Svc) -> NetworkOut:
    ctx.authorize(actions.NETWORKS_READ, Scope.network(tenant, network))
    return _out(svc.networks.store.get(tenant, network))


@router.delete("/{network}", status_code=204, openapi_extra=_x(actions.NETWORKS_DELETE))
def delete_network(tenant: str, network: str, ctx: Ctx, svc: Svc) -> Response:
    ctx.authorize(actions.NETWORKS_DELETE, Scope.network(tenant, network))
    svc.networks.delete(svc.networks.store.get(tenant, network))
    svc.access.delete_scope(Scope.network(tenant, network))
    return Response(status_code=204)
