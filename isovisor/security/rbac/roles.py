"""Role definitions (Azure RBAC shape: actions, notActions, assignable scopes) and the
built-in roles.

A role grants an action when one of its `actions` patterns matches it and none of its
`not_actions` does. notActions are not denies: another assignment may still grant the
action (as in Azure)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from isovisor.security.rbac.errors import RbacError, RoleDefinitionError
from isovisor.security.rbac.patterns import check_pattern, matches_any
from isovisor.security.rbac.scopes import ROOT, Scope

ROLE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9 ._-]{0,62}$")
MAX_PATTERNS = 64  # per list; a role is read on every request


@dataclass(frozen=True)
class RoleDefinition:
    name: str
    description: str
    actions: tuple[str, ...]
    not_actions: tuple[str, ...] = ()
    # Custom roles live at one scope and may be assigned at it and below it.
    scope: Scope = ROOT
    builtin: bool = False
    # Built-ins that make sense only host-wide are assignable at `/` alone.
    root_only: bool = False

    def grants(self, action: str) -> bool:
        return matches_any(self.actions, action) and not matches_any(self.not_actions, action)

    def assignable_at(self, scope: Scope) -> bool:
        if self.root_only:
            return scope == ROOT
        return self.scope.contains(scope)


# Management of the tenant set, quotas and the audit log stays with the host.
_HOST_ONLY = ("tenants/write", "tenants/delete", "quotas/write", "audit/*", "host/*")
_ACCESS_ADMIN = ("roleAssignments/write", "roleAssignments/delete",
                 "roleDefinitions/write", "roleDefinitions/delete")

OWNER = RoleDefinition(
    "Owner", "Full access to the resources in scope, including granting access to others; "
    "not the tenant set, quotas or the audit log.", ("*",), _HOST_ONLY, builtin=True)
CONTRIBUTOR = RoleDefinition(
    "Contributor", "Create and manage every resource in scope; cannot grant access.",
    ("*",), _HOST_ONLY + _ACCESS_ADMIN, builtin=True)
READER = RoleDefinition(
    "Reader", "View every resource in scope; change nothing.", ("*/read",),
    ("audit/*", "host/*"), builtin=True)
VM_OPERATOR = RoleDefinition(
    "VM Operator", "View, start, stop, pause and resume VMs and use their consoles; "
    "cannot create or delete them.",
    ("tenants/read", "images/read", "vms/read", "vms/metrics/read", "vms/start/action",
     "vms/stop/action", "vms/pause/action", "vms/resume/action", "vms/console/action"),
    builtin=True)
AUDITOR = RoleDefinition(
    "Auditor", "Read the audit log and every resource in scope; change nothing.",
    ("*/read",), builtin=True)
HOST_ADMIN = RoleDefinition(
    "Host Admin", "Everything on the host: tenants, quotas, access, audit.", ("*",),
    builtin=True, root_only=True)

BUILTIN_ROLES: dict[str, RoleDefinition] = {
    r.name: r for r in (OWNER, CONTRIBUTOR, READER, VM_OPERATOR, AUDITOR, HOST_ADMIN)
}


def builtin_role(name: str) -> RoleDefinition | None:
    for role in BUILTIN_ROLES.values():
        if role.name.lower() == name.lower():
            return role
    return None


def custom_role(name: str, description: str, actions: list[str], not_actions: list[str],
                scope: Scope) -> RoleDefinition:
    """Validate and build a custom role; raises RoleDefinitionError with the reason."""
    if not ROLE_NAME_RE.match(name):
        raise RoleDefinitionError(
            f"{name!r} is not a role name (a letter, then letters, digits, spaces, '.', '_', '-')")
    if builtin_role(name) is not None:
        raise RoleDefinitionError(f"{name!r} is the name of a built-in role")
    if not actions:
        raise RoleDefinitionError("a role needs at least one action")
    for patterns in (actions, not_actions):
        if len(patterns) > MAX_PATTERNS:
            raise RoleDefinitionError(f"at most {MAX_PATTERNS} patterns per list")
        for p in patterns:
            try:
                check_pattern(p)
            except RbacError as exc:
                raise RoleDefinitionError(str(exc)) from exc
    return RoleDefinition(name=name, description=description[:400], actions=tuple(actions),
                          not_actions=tuple(not_actions), scope=scope)
