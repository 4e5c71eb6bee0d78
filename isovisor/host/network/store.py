"""Tenant networks and VM NICs in SQLite (tables `networks` and `nics`, migration 3).

A network belongs to one tenant and is named within it; a NIC belongs to one VM and one
network of the VM's own tenant: `allocate_nics` looks networks up by (tenant, name), so a
VM spec can never name another tenant's network (there is no syntax for it). Each NIC gets
a fresh locally administered MAC (unique on the host) and the lowest free address of its
network. Each network has a network namespace of its own, so networks of different tenants
may use the same or overlapping CIDRs; a tenant's own networks may not overlap each other
(a VM with NICs on two of them would have two routes to one address; see docs/NET.md)."""

from __future__ import annotations

import ipaddress
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from isovisor.host.db import Database
from isovisor.host.errors import Conflict, InvalidRequest, NotFound
from isovisor.host.models import Page, check_name, now
from isovisor.host.network.addressing import (
    NetworkPlan,
    NicPlan,
    new_id,
    new_mac,
    next_free_ip,
    parse_cidr,
)
from isovisor.host.paging import paginate

MAX_NICS = 4  # per VM (the VMM takes up to 4 virtio-net devices)
MAX_NETWORKS_PER_TENANT = 64


@dataclass(frozen=True)
class Network:
    tenant: str
    name: str
    id: str
    cidr: str
    created_at: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Network:
        return cls(row["tenant"], row["name"], row["id"], row["cidr"], row["created_at"])

    @property
    def plan(self) -> NetworkPlan:
        return NetworkPlan(self.id, ipaddress.IPv4Network(self.cidr))

    @property
    def gateway(self) -> str:
        return str(self.plan.gateway)


@dataclass(frozen=True)
class Nic:
    id: str
    vm_id: str
    slot: int
    network: Network
    mac: str
    ip: str

    @property
    def plan(self) -> NicPlan:
        return NicPlan(self.id, self.network.plan, self.mac, ipaddress.IPv4Address(self.ip))


_NIC_SELECT = ("SELECT nics.id AS nic_id, nics.vm_id, nics.slot, nics.mac, nics.ip, "
               "networks.* FROM nics JOIN networks ON networks.id = nics.network_id ")


def _nic(row: sqlite3.Row) -> Nic:
    return Nic(row["nic_id"], row["vm_id"], row["slot"], Network.from_row(row), row["mac"],
               row["ip"])


class NetworkStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- networks ----------------------------------------------------------------------------

    def create(self, tenant: str, name: str, cidr: str) -> Network:
        check_name("network", name)
        net = parse_cidr(cidr)
        with self.db.write() as conn:
            if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (tenant,)).fetchone() is None:
                raise NotFound(f"tenant {tenant!r} not found")
            count = conn.execute("SELECT COUNT(*) FROM networks WHERE tenant = ?",
                                 (tenant,)).fetchone()[0]
            if count >= MAX_NETWORKS_PER_TENANT:
                raise Conflict(f"tenant {tenant!r} has {count} networks, the most allowed")
            if conn.execute("SELECT 1 FROM networks WHERE tenant = ? AND name = ?",
                            (tenant, name)).fetchone():
                raise Conflict(f"network {name!r} already exists")
            for other, cidr in conn.execute("SELECT name, cidr FROM networks WHERE tenant = ?",
                                            (tenant,)):
                if net.overlaps(ipaddress.IPv4Network(cidr)):
                    raise Conflict(f"CIDR {net} overlaps {cidr} of this tenant's network "
                                   f"{other!r}; choose another range")
            while True:
                net_id = new_id()
                if conn.execute("SELECT 1 FROM networks WHERE id = ?", (net_id,)).fetchone() \
                        is None:
                    break
            conn.execute("INSERT INTO networks (tenant, name, id, cidr, created_at) "
                         "VALUES (?, ?, ?, ?, ?)", (tenant, name, net_id, str(net), now()))
        return self.get(tenant, name)

    def get(self, tenant: str, name: str) -> Network:
        row = self.db.conn.execute("SELECT * FROM networks WHERE tenant = ? AND name = ?",
                                   (tenant, name)).fetchone()
        if row is None:
            raise NotFound(f"network {name!r} not found")
        return Network.from_row(row)

    def page(self, tenant: str, limit: int | None, token: str | None,
             keep: Callable[[Network], bool]) -> Page[Network]:
        return paginate(self.db.conn, "SELECT * FROM networks WHERE tenant = ?", (tenant,),
                        "name", Network.from_row, limit, token, keep)

    def all(self) -> list[Network]:
        return [Network.from_row(r) for r in self.db.conn.execute("SELECT * FROM networks")]

    def delete(self, network: Network) -> None:
        """Remove the record; Conflict while any VM has a NIC on it."""
        with self.db.write() as conn:
            if conn.execute("SELECT 1 FROM nics WHERE network_id = ?",
                            (network.id,)).fetchone():
                raise Conflict(f"network {network.name!r} still has VM NICs; delete those "
                               "VMs first")
            conn.execute("DELETE FROM networks WHERE id = ?", (network.id,))

    # -- NICs ----------------------------------------------------------------------------

    @staticmethod
    def allocate_nics(conn: sqlite3.Connection, tenant: str, vm_id: str,
                      networks: Sequence[str]) -> None:
        """Inside the VM's create transaction: one NIC per named network of `tenant`."""
        if len(networks) > MAX_NICS:
            raise InvalidRequest(f"at most {MAX_NICS} NICs")
        for slot, name in enumerate(networks):
            check_name("network", name)
            row = conn.execute("SELECT * FROM networks WHERE tenant = ? AND name = ?",
                               (tenant, name)).fetchone()
            if row is None:
                raise InvalidRequest(f"network {name!r} not found in tenant {tenant!r}")
            net = Network.from_row(row)
            used = [r[0] for r in conn.execute("SELECT ip FROM nics WHERE network_id = ?",
                                               (net.id,))]
            ip = next_free_ip(ipaddress.IPv4Network(net.cidr), used)
            while True:
                nic_id, mac = new_id(), new_mac()
                if conn.execute("SELECT 1 FROM nics WHERE id = ? OR mac = ?",
                                (nic_id, mac)).fetchone() is None:
                    break
            conn.execute("INSERT INTO nics (id, vm_id, slot, network_id, mac, ip) "
                         "VALUES (?, ?, ?, ?, ?, ?)", (nic_id, vm_id, slot, net.id, mac,
                                                       str(ip)))

    def nics_of_vm(self, vm_id: str) -> list[Nic]:
        rows = self.db.conn.execute(_NIC_SELECT + "WHERE nics.vm_id = ? ORDER BY nics.slot",
                                    (vm_id,))
        return [_nic(r) for r in rows]

    def nics_of_network(self, network_id: str) -> list[Nic]:
        rows = self.db.conn.execute(_NIC_SELECT + "WHERE nics.network_id = ? ORDER BY nics.ip",
                                    (network_id,))
        return [_nic(r) for r in rows]
