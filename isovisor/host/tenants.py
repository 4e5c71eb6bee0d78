"""Tenants and their quotas."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from isovisor.host.db import Database
from isovisor.host.errors import Conflict, InvalidRequest, NotFound
from isovisor.host.models import Page, Quota, Tenant, check_name, now
from isovisor.host.paging import paginate

# Quotas a new tenant gets unless the creator says otherwise.
DEFAULT_QUOTA = Quota(max_vcpus=8, max_memory_mib=8192, max_vms=10)
# Upper bounds on what a quota may say (a typo must not grant a tenant the whole host).
QUOTA_LIMITS = Quota(max_vcpus=4096, max_memory_mib=16 << 20, max_vms=100_000)


def check_quota(q: Quota) -> Quota:
    for field, top in (("max_vcpus", QUOTA_LIMITS.max_vcpus),
                       ("max_memory_mib", QUOTA_LIMITS.max_memory_mib),
                       ("max_vms", QUOTA_LIMITS.max_vms)):
        value = getattr(q, field)
        if not 0 <= value <= top:
            raise InvalidRequest(f"quota {field} must be between 0 and {top}")
    return q


class TenantStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, name: str, description: str = "", quota: Quota = DEFAULT_QUOTA) -> Tenant:
        check_name("tenant", name)
        check_quota(quota)
        with self.db.write() as conn:
            try:
                conn.execute(
                    "INSERT INTO tenants (name, description, max_vcpus, max_memory_mib, max_vms,"
                    " created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (name, description[:400], quota.max_vcpus, quota.max_memory_mib,
                     quota.max_vms, now()))
            except sqlite3.IntegrityError:
                raise Conflict(f"tenant {name!r} already exists") from None
        return self.get(name)

    def get(self, name: str) -> Tenant:
        row = self.db.conn.execute("SELECT * FROM tenants WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise NotFound(f"tenant {name!r} not found")
        return Tenant.from_row(row)

    def exists(self, name: str) -> bool:
        return self.db.conn.execute(
            "SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone() is not None

    def page(self, limit: int | None, token: str | None,
             keep: Callable[[Tenant], bool]) -> Page[Tenant]:
        return paginate(self.db.conn, "SELECT * FROM tenants WHERE 1", (), "name",
                        Tenant.from_row, limit, token, keep)

    def set_quota(self, name: str, quota: Quota) -> Tenant:
        check_quota(quota)
        with self.db.write() as conn:
            cur = conn.execute(
                "UPDATE tenants SET max_vcpus = ?, max_memory_mib = ?, max_vms = ? WHERE name = ?",
                (quota.max_vcpus, quota.max_memory_mib, quota.max_vms, name))
            if cur.rowcount == 0:
                raise NotFound(f"tenant {name!r} not found")
        return self.get(name)

    def usage(self, name: str) -> Quota:
        row = self.db.conn.execute(
            "SELECT COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0), COUNT(*) "
            "FROM vms WHERE tenant = ?", (name,)).fetchone()
        return Quota(int(row[0]), int(row[1]), int(row[2]))

    def delete(self, name: str) -> None:
        """Only an empty tenant (no VMs, images or networks) can be deleted; its role
        assignments go with it."""
        with self.db.write() as conn:
            if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound(f"tenant {name!r} not found")
            for table, what in (("vms", "VMs"), ("images", "images"), ("networks", "networks")):
                if conn.execute(f"SELECT 1 FROM {table} WHERE tenant = ?", (name,)).fetchone():
                    raise Conflict(f"tenant {name!r} still has {what}; delete them first")
            conn.execute("DELETE FROM role_definitions WHERE scope = ? OR scope LIKE ?",
                         (f"/tenants/{name}", f"/tenants/{name}/%"))
            conn.execute("DELETE FROM tenants WHERE name = ?", (name,))
