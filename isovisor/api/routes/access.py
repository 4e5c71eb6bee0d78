"""/v1/roleAssignments and /v1/roleDefinitions: who may do what, where."""

from __future__ import annotations

from fastapi import APIRouter, Query, Response

from isovisor.api.errors import ERROR_RESPONSES
from isovisor.api.routes.deps import Ctx, IdempotencyKey, Svc, idempotent_create
from isovisor.api.schemas import (
    RoleAssignmentCreate,
    RoleAssignmentOut,
    RoleAssignmentPage,
    RoleDefinitionCreate,
    RoleDefinitionList,
    RoleDefinitionOut,
)
from isovisor.host.access import parse_scope
from isovisor.host.errors import Forbidden, InvalidRequest, NotFound
from isovisor.host.models import RoleAssignment
from isovisor.security.rbac import (
    ROOT,
    Decision,
    RbacError,
    RoleDefinition,
    Scope,
    actions,
    custom_role,
)

router = APIRouter(tags=["access"], responses=ERROR_RESPONSES)
_SCOPE_Q = Query("/", max_length=200, description="a scope such as / or /tenants/t")


def _x(action: str, scope: str) -> dict[str, object]:
    return {"x-isovisor-action": action, "x-isovisor-scope": scope}


@router.get("/v1/roleAssignments", response_model=RoleAssignmentPage,
            openapi_extra=_x(actions.ROLE_ASSIGNMENTS_READ, "{scope}"))
def list_assignments(ctx: Ctx, svc: Svc, scope: str = _SCOPE_Q,
                     limit: int | None = Query(None, ge=1, le=200),
                     page_token: str | None = Query(None, alias="pageToken", max_length=400)
                     ) -> RoleAssignmentPage:
    within = parse_scope(scope)
    keep = ctx.authorize_list(actions.ROLE_ASSIGNMENTS_READ, within)
    page = svc.access.list_assignments(within, limit, page_token,
                                       lambda a: keep(Scope.parse(a.scope)))
    return RoleAssignmentPage(items=[RoleAssignmentOut.of(a) for a in page.items],
                              next_page_token=page.next_token)


@router.post("/v1/roleAssignments", status_code=201, response_model=RoleAssignmentOut,
             openapi_extra=_x(actions.ROLE_ASSIGNMENTS_WRITE, "{body.scope}"))
def create_assignment(body: RoleAssignmentCreate, ctx: Ctx, svc: Svc,
                      idempotency_key: IdempotencyKey = None) -> Response:
    scope = parse_scope(body.scope)
    ctx.authorize(actions.ROLE_ASSIGNMENTS_WRITE, scope)
    _no_escalation(ctx, svc.access.find_role(body.role, scope), scope)
    return idempotent_create(ctx, svc, idempotency_key, body, lambda: RoleAssignmentOut.of(
        svc.access.assign(body.principal, body.role, scope, ctx.principal)))


def _no_escalation(ctx: Ctx, role: RoleDefinition, scope: Scope) -> None:
    """Nobody grants what they do not hold themselves at that scope."""
    missing = ctx.authorizer.missing_for_grant(role, scope)
    if missing:
        raise Forbidden(f"{ctx.principal!r} cannot grant actions it does not hold at {scope}: "
                        + ", ".join(missing))


def _assignment(ctx: Ctx, svc: Svc, assignment_id: str, action: str) -> RoleAssignment:
    """Its scope decides; a hidden assignment answers exactly like a missing one."""
    missing = NotFound(f"role assignment {assignment_id!r} not found")
    try:
        found = svc.access.get_assignment(assignment_id)
    except NotFound:
        ctx.decide(action, ROOT)
        raise missing from None
    scope = Scope.parse(found.scope)
    decision = ctx.decide(action, scope)
    if decision is Decision.HIDDEN:
        raise missing
    if decision is Decision.DENY:
        raise Forbidden(f"{ctx.principal!r} may not {action} at {scope}")
    return found


@router.get("/v1/roleAssignments/{assignment_id}", response_model=RoleAssignmentOut,
            openapi_extra=_x(actions.ROLE_ASSIGNMENTS_READ, "{assignment.scope}"))
def get_assignment(assignment_id: str, ctx: Ctx, svc: Svc) -> RoleAssignmentOut:
    return RoleAssignmentOut.of(_assignment(ctx, svc, assignment_id,
                                            actions.ROLE_ASSIGNMENTS_READ))


@router.delete("/v1/roleAssignments/{assignment_id}", status_code=204,
               openapi_extra=_x(actions.ROLE_ASSIGNMENTS_DELETE, "{assignment.scope}"))
def delete_assignment(assignment_id: str, ctx: Ctx, svc: Svc) -> Response:
    found = _assignment(ctx, svc, assignment_id, actions.ROLE_ASSIGNMENTS_DELETE)
    svc.access.unassign(found.id)
    return Response(status_code=204)


@router.get("/v1/roleDefinitions", response_model=RoleDefinitionList,
            openapi_extra=_x(actions.ROLE_DEFINITIONS_READ, "{scope}"))
def list_roles(ctx: Ctx, svc: Svc, scope: str = _SCOPE_Q) -> RoleDefinitionList:
    at = parse_scope(scope)
    ctx.authorize(actions.ROLE_DEFINITIONS_READ, at)
    if at.tenant_name is not None:
        svc.tenants.get(at.tenant_name)
    return RoleDefinitionList(items=[RoleDefinitionOut.of(r)
                                     for r in svc.access.roles_assignable_at(at)])


@router.post("/v1/roleDefinitions", status_code=201, response_model=RoleDefinitionOut,
             openapi_extra=_x(actions.ROLE_DEFINITIONS_WRITE, "{body.scope}"))
def create_role(body: RoleDefinitionCreate, ctx: Ctx, svc: Svc,
                idempotency_key: IdempotencyKey = None) -> Response:
    at = parse_scope(body.scope)
    ctx.authorize(actions.ROLE_DEFINITIONS_WRITE, at)
    try:
        role = custom_role(body.name, body.description, body.actions, body.not_actions, at)
    except RbacError as exc:
        raise InvalidRequest(str(exc)) from None
    _no_escalation(ctx, role, at)
    return idempotent_create(ctx, svc, idempotency_key, body, lambda: RoleDefinitionOut.of(
        svc.access.create_role(body.name, body.description, body.actions, body.not_actions,
                               at)))


@router.delete("/v1/roleDefinitions/{name}", status_code=204,
               openapi_extra=_x(actions.ROLE_DEFINITIONS_DELETE, "{scope}"))
def delete_role(name: str, ctx: Ctx, svc: Svc, scope: str = _SCOPE_Q) -> Response:
    at = parse_scope(scope)
    ctx.authorize(actions.ROLE_DEFINITIONS_DELETE, at)
    svc.access.delete_role(name, at)
    return Response(status_code=204)

