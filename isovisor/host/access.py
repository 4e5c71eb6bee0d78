"""Role definitions (built-in and custom) and role assignments, and the `Authorizer` of a
principal built from them."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable

from isovisor.host.db import Database
from isovisor.host.errors import Conflict, InvalidRequest, NotFound
from isovisor.host.models import Page, RoleAssignment, now
from isovisor.host.paging import paginate
from isovisor.security.pki import PkiError, check_name
from isovisor.security.rbac import (
    BUILTIN_ROLES,
    Authorizer,
    Grant,
    RbacError,
    RoleDefinition,
    Scope,
    builtin_role,
    custom_role,
)


def parse_scope(text: str) -> Scope:
    try:
        return Scope.parse(text)
    except RbacError as exc:
        raise InvalidRequest(str(exc)) from None


class AccessStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- role definitions ---------------------------------------------------------------

    def _custom_from_row(self, row: sqlite3.Row) -> RoleDefinition:
        return RoleDefinition(name=row["name"], description=row["description"],
                              actions=tuple(json.loads(row["actions"])),
                              not_actions=tuple(json.loads(row["not_actions"])),
                              scope=Scope.parse(row["scope"]))

    def create_role(self, name: str, description: str, actions: list[str],
                    not_actions: list[str], scope: Scope) -> RoleDefinition:
        try:
            role = custom_role(name, description, actions, not_actions, scope)
        except RbacError as exc:
            raise InvalidRequest(str(exc)) from None
        tenant = scope.tenant_name
        with self.db.write() as conn:
            if tenant is not None and conn.execute(
                    "SELECT 1 FROM tenants WHERE name = ?", (tenant,)).fetchone() is None:
                raise NotFound(f"tenant {tenant!r} not found")
            try:
                conn.execute(
                    "INSERT INTO role_definitions (scope, name, description, actions, "
                    "not_actions, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (str(scope), role.name, role.description, json.dumps(role.actions),
                     json.dumps(role.not_actions), now()))
            except sqlite3.IntegrityError:
                raise Conflict(f"role {name!r} already exists at {scope}") from None
        return role

    def roles_assignable_at(self, scope: Scope) -> list[RoleDefinition]:
        """Built-ins assignable there, then custom roles defined at the scope or above."""
        roles = [r for r in BUILTIN_ROLES.values() if r.assignable_at(scope)]
        rows = self.db.conn.execute("SELECT * FROM role_definitions ORDER BY scope, name")
        roles += [r for r in map(self._custom_from_row, rows) if r.assignable_at(scope)]
        return roles

    def find_role(self, name: str, scope: Scope) -> RoleDefinition:
        """The role `name` as it would apply to an assignment at `scope` (the custom role
        defined nearest above it)."""
        role = builtin_role(name)
        if role is not None:
            return role
        found = [r for r in self.roles_assignable_at(scope) if r.name == name]
        if not found:
            raise NotFound(f"role {name!r} not found at {scope}")
        return max(found, key=lambda r: len(r.scope.parts))

    def custom_role_at(self, name: str, scope: Scope) -> RoleDefinition:
        row = self.db.conn.execute("SELECT * FROM role_definitions WHERE scope = ? AND name = ?",
                                   (str(scope), name)).fetchone()
        if row is None:
            raise NotFound(f"role {name!r} not found at {scope}")
        return self._custom_from_row(row)

    def delete_role(self, name: str, scope: Scope) -> None:
        with self.db.write() as conn:
            if conn.execute("SELECT 1 FROM role_definitions WHERE scope = ? AND name = ?",
                            (str(scope), name)).fetchone() is None:
                raise NotFound(f"role {name!r} not found at {scope}")
            if conn.execute("SELECT 1 FROM role_assignments WHERE role = ? AND role_scope = ?",
                            (name, str(scope))).fetchone():
                raise Conflict(f"role {name!r} is still assigned; remove its assignments first")
            conn.execute("DELETE FROM role_definitions WHERE scope = ? AND name = ?",
                         (str(scope), name))

    # -- assignments ---------------------------------------------------------------------

    def assign(self, principal: str, role_name: str, scope: Scope,
               created_by: str) -> RoleAssignment:
        try:
            check_name(principal)
        except PkiError as exc:
            raise InvalidRequest(str(exc)) from None
        role = self.find_role(role_name, scope)
        if not role.assignable_at(scope):
            raise InvalidRequest(f"role {role.name!r} cannot be assigned at {scope}")
        tenant = scope.tenant_name
        assignment_id = uuid.uuid4().hex
        with self.db.write() as conn:
            if tenant is not None and conn.execute(
                    "SELECT 1 FROM tenants WHERE name = ?", (tenant,)).fetchone() is None:
                raise NotFound(f"tenant {tenant!r} not found")
            try:
                conn.execute(
                    "INSERT INTO role_assignments (id, principal, role, role_scope, scope, tenant,"
                    " created_at, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (assignment_id, principal, role.name,
                     None if role.builtin else str(role.scope), str(scope), tenant, now(),
                     created_by))
            except sqlite3.IntegrityError:
                raise Conflict(
                    f"{principal!r} already holds {role.name!r} at {scope}") from None
        return self.get_assignment(assignment_id)

    def get_assignment(self, assignment_id: str) -> RoleAssignment:
        row = self.db.conn.execute("SELECT * FROM role_assignments WHERE id = ?",
                                   (assignment_id,)).fetchone()
        if row is None:
            raise NotFound(f"role assignment {assignment_id!r} not found")
        return RoleAssignment.from_row(row)

    def list_assignments(self, within: Scope, limit: int | None, token: str | None,
                         keep: Callable[[RoleAssignment], bool]) -> Page[RoleAssignment]:
        """Assignments at `within` or below it."""
        query = "SELECT * FROM role_assignments WHERE 1"
        params: tuple[str, ...] = ()
        if within.parts:
            query = "SELECT * FROM role_assignments WHERE (scope = ? OR scope LIKE ?)"
            params = (str(within), f"{within}/%")
        return paginate(self.db.conn, query, params, "id", RoleAssignment.from_row, limit,
                        token, keep)

    def unassign(self, assignment_id: str) -> None:
        with self.db.write() as conn:
            cur = conn.execute("DELETE FROM role_assignments WHERE id = ?", (assignment_id,))
            if cur.rowcount == 0:
                raise NotFound(f"role assignment {assignment_id!r} not found")

    def delete_scope(self, scope: Scope) -> None:
        """Drop the assignments at and below a deleted resource."""
        with self.db.write() as conn:
            conn.execute("DELETE FROM role_assignments WHERE scope = ? OR scope LIKE ?",
                         (str(scope), f"{scope}/%"))

    # -- decisions ----------------------------------------------------------------------

    def authorizer(self, principal: str) -> Authorizer:
        rows = self.db.conn.execute(
            "SELECT role, role_scope, scope FROM role_assignments WHERE principal = ?",
            (principal,)).fetchall()
        grants: list[Grant] = []
        for row in rows:
            scope = Scope.parse(row["scope"])
            if row["role_scope"] is None:
                role = builtin_role(row["role"])
            else:
                try:
                    role = self.custom_role_at(row["role"], Scope.parse(row["role_scope"]))
                except NotFound:
                    role = None
            if role is not None:
                grants.append(Grant(role, scope))
        return Authorizer(principal, grants)

    def note_principal(self, name: str, serial: int) -> None:
        stamp = now()
        with self.db.write() as conn:
            conn.execute(
                "INSERT INTO principals (name, first_seen, last_seen, last_serial) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                "last_seen = excluded.last_seen, last_serial = excluded.last_serial",
                (name, stamp, stamp, f"{serial:x}"))
