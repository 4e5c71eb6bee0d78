"""Hierarchical scopes: `/`, `/tenants/{t}`, `/tenants/{t}/vms/{v}`, `/tenants/{t}/images/{i}`,
`/tenants/{t}/networks/{n}`, `/tenants/{t}/disks/{d}`.

A scope is parsed once into a `Scope` (a tuple of (collection, name) pairs) and compared
structurally, never as strings: `/tenants/a` is not an ancestor of `/tenants/ab`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from isovisor.security.rbac.errors import ScopeError

# Names inside scopes are resource names: the API enforces the same pattern on create.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# What may sit under what; anything else is not a scope.
CHILDREN: dict[str | None, frozenset[str]] = {
    None: frozenset({"tenants"}),
    "tenants": frozenset({"vms", "images", "networks", "disks"}),
}
MAX_DEPTH = 2


@dataclass(frozen=True, order=True)
class Scope:
    parts: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Scope:
        if not text.startswith("/"):
            raise ScopeError(f"scope {text!r} must start with '/'")
        if text == "/":
            return ROOT
        segments = text.rstrip("/").split("/")[1:] if text != "/" else []
        if len(segments) % 2 or len(segments) // 2 > MAX_DEPTH:
            raise ScopeError(f"scope {text!r} is not /, /tenants/T or /tenants/T/vms/V")
        parts: list[tuple[str, str]] = []
        parent: str | None = None
        for i in range(0, len(segments), 2):
            collection, name = segments[i], segments[i + 1]
            if collection not in CHILDREN.get(parent, frozenset()):
                raise ScopeError(f"scope {text!r}: {collection!r} cannot appear there")
            if not NAME_RE.match(name):
                raise ScopeError(f"scope {text!r}: {name!r} is not a valid resource name")
            parts.append((collection, name))
            parent = collection
        return cls(tuple(parts))

    @classmethod
    def tenant(cls, tenant: str) -> Scope:
        return cls((("tenants", tenant),))

    @classmethod
    def vm(cls, tenant: str, vm: str) -> Scope:
        return cls((("tenants", tenant), ("vms", vm)))

    @classmethod
    def image(cls, tenant: str, image: str) -> Scope:
        return cls((("tenants", tenant), ("images", image)))

    @classmethod
    def network(cls, tenant: str, network: str) -> Scope:
        return cls((("tenants", tenant), ("networks", network)))

    @classmethod
    def disk(cls, tenant: str, disk: str) -> Scope:
        return cls((("tenants", tenant), ("disks", disk)))

    def contains(self, other: Scope) -> bool:
        """True when `other` is this scope or lies below it."""
        return other.parts[: len(self.parts)] == self.parts

    def related(self, other: Scope) -> bool:
        """Ancestor, equal or descendant: either contains the other."""
        return self.contains(other) or other.contains(self)

    @property
    def tenant_name(self) -> str | None:
        return self.parts[0][1] if self.parts else None

    @property
    def parent(self) -> Scope:
        return Scope(self.parts[:-1])

    def __str__(self) -> str:
        return "/" + "/".join(f"{c}/{n}" for c, n in self.parts)


ROOT = Scope(())
