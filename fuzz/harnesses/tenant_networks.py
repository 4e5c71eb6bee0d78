"""Tenant networks below the API: NetworkStore and VmStore on a real SQLite database, fed
sequences of network creates and deletes (fuzzed names and CIDR text) and VM creates with
fuzzed NIC lists, in two tenants; then the nftables text generated for every network and
NIC. (The API pipeline itself is `api_requests`'s.)

Oracles: nothing but HostError escapes; a refused operation changes no row; one tenant's
networks never overlap (two tenants' may: each network has a namespace of its own, whose
name is valid and unique), each is a valid /16../29 IPv4 CIDR, and an overlap refusal
names a range of the requesting tenant only; every NIC's address lies
inside its network, is neither the network, gateway nor broadcast address, and is unique
in it; MACs are unique, unicast and locally administered; a NIC's network belongs to its
VM's tenant; each NIC's ruleset names exactly its own TAP, MAC and IP."""

from __future__ import annotations

import ipaddress
import re
import tempfile
from pathlib import Path
from typing import Any

from fuzz.data import Data

COVERS = ("api:POST /v1/tenants/{tenant}/networks",
          "api:DELETE /v1/tenants/{tenant}/networks/{network}",
          "api:GET /v1/tenants/{tenant}/networks*",
          "api:POST /v1/tenants/{tenant}/vms")
CI_RUNS = 100
TENANTS = ("a", "b")
NAMES = ("lan", "dmz", "x", "", "A", "..", "a-b", "x" * 70, "../b", "lan ")
CIDRS = ("10.0.0.0/24", "10.0.0.0/16", "10.0.0.128/25", "10.0.1.0/29", "10.0.0.0/30",
         "10.0.0.1/24", "192.168.0.0/24", "127.0.0.0/16", "224.0.0.0/24", "0.0.0.0/16",
         "fd00::/64", "10.0.0.0/33", "10.0.0.0", "", "10.0.0.0/024", " 10.0.2.0/24 ",
         "10.0.0.0/2x")
_MAC = re.compile(r"(?:[0-9a-f]{2}:){5}[0-9a-f]{2}")
_state: dict[str, Any] = {}


def setup() -> None:
    _state["tmp"] = tempfile.TemporaryDirectory(prefix="isovisor-fuzz-net-")


def _snapshot(db: Any) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], list[Any]]:
    c = db.conn
    return ([tuple(r) for r in c.execute("SELECT * FROM networks ORDER BY id")],
            [tuple(r) for r in c.execute("SELECT * FROM nics ORDER BY id")],
            [tuple(r) for r in c.execute("SELECT id FROM vms ORDER BY id")])


def _check(db: Any, networks: Any) -> None:
    from isovisor.devices.tap import check_netns_name
    from isovisor.host.network import ruleset
    from isovisor.host.network.addressing import netns_name, parse_cidr

    nets = networks.all()
    for i, a in enumerate(nets):
        for b in nets[i + 1:]:
            if a.tenant == b.tenant:
                assert not parse_cidr(a.cidr).overlaps(parse_cidr(b.cidr)), (a, b)
    spaces = {check_netns_name(netns_name("isovisor", n.id)) for n in nets}
    assert len(spaces) == len(nets), "two networks in one namespace"
    macs: set[str] = set()
    for n in nets:
        guard = ruleset.network_ruleset(n.plan)
        assert f"arp daddr ip {n.plan.gateway} accept" in guard
        assert set(re.findall(r"\d+\.\d+\.\d+\.\d+", guard)) == {
            str(n.plan.gateway), "255.255.255.255"}, guard
        ips: set[str] = set()
        for nic in networks.nics_of_network(n.id):
            net = ipaddress.IPv4Network(n.cidr)
            ip = ipaddress.IPv4Address(nic.ip)
            assert ip in net and ip not in (net.network_address, net.network_address + 1,
                                            net.broadcast_address), (ip, net)
            assert nic.ip not in ips and nic.mac not in macs
            ips.add(nic.ip)
            macs.add(nic.mac)
            first = int(nic.mac[:2], 16)
            assert first & 1 == 0 and first & 2 == 2, nic.mac
            vm_tenant = db.conn.execute("SELECT tenant FROM vms WHERE id = ?",
                                        (nic.vm_id,)).fetchone()[0]
            assert vm_tenant == n.tenant, "a NIC on another tenant's network"
            rules = ruleset.nic_ruleset(nic.plan)
            assert set(_MAC.findall(rules)) == {nic.mac}
            assert nic.plan.tap in rules and f"ip saddr {nic.ip} accept" in rules
            addrs = set(re.findall(r"\d+\.\d+\.\d+\.\d+", rules))
            assert addrs <= {nic.ip, "0.0.0.0", "255.255.255.255"}, addrs


def one_input(data: bytes) -> None:
    from isovisor.host.db import Database
    from isovisor.host.errors import HostError
    from isovisor.host.images import ImageStore
    from isovisor.host.network.store import NetworkStore
    from isovisor.host.tenants import TenantStore
    from isovisor.host.vms import VmSpec, VmStore

    if not _state:
        setup()
    d = Data(data)
    with tempfile.TemporaryDirectory(dir=_state["tmp"].name) as tmp:
        db = Database(Path(tmp) / "state.sqlite3")
        try:
            tenants, images = TenantStore(db), ImageStore(db, Path(tmp) / "images")
            vms, networks = VmStore(db), NetworkStore(db)
            for t in TENANTS:
                tenants.create(t)
                images.put(t, "k", [b"\x7fELF"])
            for step in range(d.u8() % 24 + 1):
                if d.exhausted:
                    break
                op, tenant = d.u8() % 4, TENANTS[d.u8() & 1]
                name = NAMES[d.u8() % len(NAMES)] if d.flag() else d.blob(20).decode(
                    "utf-8", "replace")
                before = _snapshot(db)
                try:
                    if op == 0:
                        cidr = CIDRS[d.u8() % len(CIDRS)] if d.flag() else (
                            f"10.{d.u8()}.{d.u8()}.{d.u8()}/{d.u8() % 40}")
                        networks.create(tenant, name, cidr)
                    elif op == 1:
                        networks.delete(networks.get(tenant, name))
                    elif op == 2:
                        nics = tuple(NAMES[d.u8() % 3] for _ in range(d.u8() % 6))
                        vms.create(tenant, VmSpec(name=f"v{step}", kernel="k", nics=nics))
                    else:
                        row = db.conn.execute("SELECT id FROM vms WHERE tenant = ? LIMIT 1",
                                              (tenant,)).fetchone()
                        if row is not None:
                            vms.delete(row[0])
                except HostError as exc:
                    assert _snapshot(db) == before, "a refused operation changed the state"
                    if op == 0 and "overlaps" in str(exc) and "reserved" not in str(exc):
                        own = {n.cidr for n in networks.all() if n.tenant == tenant}
                        assert any(c in str(exc) for c in own), (tenant, str(exc))
                _check(db, networks)
        finally:
            db.close()
