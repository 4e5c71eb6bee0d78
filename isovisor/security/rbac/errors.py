"""Errors of the RBAC model."""

from __future__ import annotations


class RbacError(Exception):
    """A malformed scope, action pattern or role definition; one sentence."""


class ScopeError(RbacError):
    """A scope string that is not `/`, `/tenants/{t}` or `/tenants/{t}/{vms|images}/{n}`."""


class RoleDefinitionError(RbacError):
    """A custom role definition that cannot be accepted."""
