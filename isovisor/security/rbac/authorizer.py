"""Decisions: deny by default; 404 (HIDDEN) for what the principal may not know exists.

The root `/` is visible to every principal. A resource at scope S is *visible* to a
principal that holds any assignment at S, above S, or below S (holding a role on a VM
reveals that its tenant exists). An invisible resource answers exactly like a missing
one. A visible resource whose action no assignment at S or above grants answers 403."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from isovisor.security.rbac.actions import ALL_ACTIONS
from isovisor.security.rbac.roles import RoleDefinition
from isovisor.security.rbac.scopes import Scope


class Decision(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"  # 403: the principal may know the resource exists
    HIDDEN = "hidden"  # 404: the principal may not know whether it exists


@dataclass(frozen=True)
class Grant:
    """One role assignment, resolved: this role at this scope."""

    role: RoleDefinition
    scope: Scope


class Authorizer:
    """The permissions of one principal for one request."""

    def __init__(self, principal: str, grants: Iterable[Grant]) -> None:
        self.principal = principal
        self.grants = tuple(grants)

    def allows(self, action: str, scope: Scope) -> bool:
        return any(g.scope.contains(scope) and g.role.grants(action) for g in self.grants)

    def can_see(self, scope: Scope) -> bool:
        if not scope.parts:
            return True  # the root exists for everyone; it reveals nothing
        return any(g.scope.related(scope) for g in self.grants)

    def decide(self, action: str, scope: Scope) -> Decision:
        if self.allows(action, scope):
            return Decision.ALLOW
        if self.can_see(scope):
            return Decision.DENY
        return Decision.HIDDEN

    def allows_anywhere_below(self, action: str, scope: Scope) -> bool:
        """True when the action is granted at `scope` or at some scope inside it (used to
        decide whether a list may show anything at all)."""
        return any(
            scope.related(g.scope) and g.role.grants(action) for g in self.grants
        )

    def missing_for_grant(self, role: RoleDefinition, scope: Scope) -> tuple[str, ...]:
        """The actions `role` grants that this principal does not hold at `scope`.

        Granting (defining or assigning a role) is limited to what the granter holds, so
        an Owner, who lacks quotas/write, cannot define a role with `*` and assign it to
        itself. Wildcards are judged on the concrete action catalogue."""
        return tuple(a for a in ALL_ACTIONS if role.grants(a) and not self.allows(a, scope))
