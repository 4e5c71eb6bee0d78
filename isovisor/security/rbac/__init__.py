"""Role-based access control modelled on Azure RBAC: role definitions with actions,
notActions and wildcards; assignments of roles to principals at hierarchical scopes;
deny by default; out-of-scope resources are hidden (404), not forbidden (403)."""

from isovisor.security.rbac import actions
from isovisor.security.rbac.authorizer import Authorizer, Decision, Grant
from isovisor.security.rbac.errors import RbacError, RoleDefinitionError, ScopeError
from isovisor.security.rbac.patterns import check_pattern, matches
from isovisor.security.rbac.roles import (
    BUILTIN_ROLES,
    RoleDefinition,
    builtin_role,
    custom_role,
)
from isovisor.security.rbac.scopes import ROOT, Scope

__all__ = [
    "BUILTIN_ROLES",
    "ROOT",
    "Authorizer",
    "Decision",
    "Grant",
    "RbacError",
    "RoleDefinition",
    "RoleDefinitionError",
    "Scope",
    "ScopeError",
    "actions",
    "builtin_role",
    "check_pattern",
    "custom_role",
    "matches",
]
