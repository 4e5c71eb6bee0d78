"""Tenant networks on real kernel networking, no VMs: NetworkPlumbing builds two tenants'
networks (each its own namespace with a bridge, TAPs, nftables, a dnsmasq) under a
namespace prefix this test made, and the guest
ends of the TAPs inject frames exactly as a VMM's virtio-net would. What each TAP's guest
end receives is what a guest would see."""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.host.network.addressing import NetworkPlan, NicPlan
from isovisor.host.network.plumbing import NetworkPlumbing
from tests.devices.virtio.netns import NetNs, namespaces_left
from tests.network.fabric import Wire, fabric, inside, network, nic
from tests.network.frames import (
    BROADCAST,
    arp_frame,
    arp_sender,
    dhcp_discover,
    dhcp_reply,
    mac_bytes,
    norm,
    payload_of,
    udp_frame,
)

NET_A = network("0000a000", "10.81.0.0/24")
NET_B = network("0000b000", "10.82.0.0/24")
A1 = nic("0000a001", NET_A, "02:aa:00:00:00:01", "10.81.0.2")
A2 = nic("0000a002", NET_A, "02:aa:00:00:00:02", "10.81.0.3")
B1 = nic("0000b001", NET_B, "02:bb:00:00:00:01", "10.82.0.2")
B2 = nic("0000b002", NET_B, "02:bb:00:00:00:02", "10.82.0.3")
NICS: dict[NetworkPlan, list[NicPlan]] = {NET_A: [A1, A2], NET_B: [B1, B2]}


class Fabric:
    def __init__(self, ns: NetNs, plumbing: NetworkPlumbing) -> None:
        self.ns, self.plumbing = ns, plumbing
        for net, nics in NICS.items():
            plumbing.ensure_network(net, nics)
            for n in nics:
                plumbing.ensure_nic(n)
        self.wires = {n.id: Wire(plumbing, n) for nics in NICS.values() for n in nics}

    def wire(self, plan: NicPlan) -> Wire:
        return self.wires[plan.id]

    def close(self) -> None:
        for w in self.wires.values():
            w.close()


@pytest.fixture
def fab(tmp_path: Path) -> Iterator[Fabric]:
    with fabric(tmp_path) as (ns, plumbing):
        f = Fabric(ns, plumbing)
        try:
            yield f
        finally:
            f.close()


def mac(plan: NicPlan) -> bytes:
    return mac_bytes(plan.mac)


def test_a_nic_sends_only_from_its_own_addresses_and_only_inside_its_network(
    fab: Fabric,
) -> None:
    a1, a2, b1, b2 = (fab.wire(p) for p in (A1, A2, B1, B2))
    ip1, ip2 = str(A1.ip), str(A2.ip)
    legit = [
        udp_frame(mac(A2), mac(A1), ip1, ip2, b"legit-unicast"),
        udp_frame(BROADCAST, mac(A1), ip1, "10.81.0.255", b"legit-broadcast"),
        udp_frame(b"\x01\x00\x5e\x00\x00\x01", mac(A1), ip1, "224.0.0.1", b"legit-multicast"),
        arp_frame(mac(A1), mac(A1), ip1, ip2),
        # To B1's MAC and IP: legitimate from A1, but only flooded inside A's bridge
        udp_frame(mac(B1), mac(A1), ip1, str(B1.ip), b"cross-tenant-unicast"),
    ]
    spoofed = [
        udp_frame(mac(A2), mac(A2), ip2, ip2, b"spoof-mac-of-neighbour"),
        udp_frame(mac(A2), mac(B1), str(B1.ip), ip2, b"spoof-mac-of-other-tenant"),
        udp_frame(mac(A2), mac(A1), "10.81.0.99", ip2, b"spoof-ip"),
        udp_frame(BROADCAST, mac(A1), ip2, "10.81.0.255", b"spoof-ip-broadcast"),
        udp_frame(mac(A2), mac(A1), "0.0.0.0", ip2, b"spoof-zero-not-dhcp"),
        arp_frame(mac(A1), mac(A1), ip2, ip2),  # claims A2's IP
        arp_frame(mac(A1), mac(A2), ip1, ip2),  # ARP sender MAC is not the frame's
        arp_frame(mac(A1), mac(A1), "10.81.0.1", ip2, op=2),  # claims the gateway
        # 802.1Q-tagged and IPv6 frames from the right addresses: not IPv4/ARP, dropped
        mac(A2) + mac(A1) + b"\x81\x00\x00\x05\x08\x00" + bytes(46),
        (mac(A2) + mac(A1) + b"\x86\xdd").ljust(60, b"\0"),
    ]
    for frame in legit + spoofed:
        a1.send(frame)
    # Tenant B's broadcast: must not reach tenant A.
    b1.send(udp_frame(BROADCAST, mac(B1), str(B1.ip), "10.82.0.255", b"b-broadcast"))

    got_a2 = a2.drain()
    assert sorted(map(norm, got_a2)) == sorted(map(norm, legit)), [f[:40].hex() for f in got_a2]
    assert list(map(norm, b2.drain())) == [norm(udp_frame(
        BROADCAST, mac(B1), str(B1.ip), "10.82.0.255", b"b-broadcast"))]
    assert b1.drain() == []  # nothing of tenant A's, its own broadcast not echoed
    # The TAP's own drop counter saw every spoofed frame (the rule, not luck, dropped them).
    rules = inside(fab.plumbing, NET_A).run("nft", "list", "table", "netdev", A1.table).stdout
    counted = sum(int(x) for x in re.findall(r"counter packets (\d+)", rules))
    assert counted == len(spoofed)


def test_guests_reach_no_host_service_but_dhcp(fab: Fabric) -> None:
    a1 = fab.wire(A1)
    ns_a, ns_b = inside(fab.plumbing, NET_A), inside(fab.plumbing, NET_B)
    gw_mac = mac_bytes(ns_a.run("cat", f"/sys/class/net/{NET_A.bridge}/address")
                       .stdout.strip())
    # A UDP listener on every host address of each network's namespace.
    listeners = [ns.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                 for ns in (ns_a, ns_b)]
    try:
        for listener in listeners:
            listener.bind(("0.0.0.0", 4000))
            listener.setblocking(False)
        # A datagram to a host port on the gateway, one to B's network through the host
        # (routing), and an ARP for an address that is not the gateway's.
        a1.send(udp_frame(gw_mac, mac(A1), str(A1.ip), str(NET_A.gateway), b"to-host"))
        a1.send(udp_frame(gw_mac, mac(A1), str(A1.ip), str(B1.ip), b"routed"))
        a1.send(arp_frame(mac(A1), mac(A1), str(A1.ip), str(NET_B.gateway)))
        # DHCP's port, but aimed at the other network's gateway (a host address too)
        a1.send(udp_frame(gw_mac, mac(A1), str(A1.ip), str(NET_B.gateway), b"x",
                          sport=68, dport=67))
        assert fab.wire(B1).drain() == []
        assert [f for f in a1.drain() if arp_sender(f)] == []  # the host answered no ARP
        for listener in listeners:
            with pytest.raises(BlockingIOError):
                listener.recvfrom(100)
    finally:
        for listener in listeners:
            listener.close()
    guard = ns_a.run("nft", "list", "table", "netdev", NET_A.table).stdout
    assert re.findall(r"counter packets (\d+)", guard) == ["4"]  # the guard dropped all four
    # ARP for the gateway is answered (a DHCP client renewing needs it) ...
    a1.send(arp_frame(mac(A1), mac(A1), str(A1.ip), str(NET_A.gateway)))
    replies = [s for f in a1.drain() if (s := arp_sender(f))]
    assert replies == [(gw_mac, str(NET_A.gateway))]
    # ... and DHCP: A1 gets its own address from its own network's server.
    a1.received.clear()
    a1.send(dhcp_discover(mac(A1)))
    offers = [r for f in a1.drain(quiet=1.0) if (r := dhcp_reply(f))]
    assert offers == [(2, str(A1.ip), str(NET_A.gateway))]


def test_dhcp_answers_only_registered_nics(fab: Fabric) -> None:
    """A MAC dnsmasq was not told about gets no offer (the range is static-only)."""
    plumbing = fab.plumbing
    plumbing.refresh_dhcp(NET_A, [A2])  # A1 no longer registered
    a1 = fab.wire(A1)
    a1.send(dhcp_discover(mac(A1)))
    assert [f for f in a1.drain(quiet=1.5) if dhcp_reply(f)] == []
    a2 = fab.wire(A2)
    a2.send(dhcp_discover(mac(A2)))
    assert [r for f in a2.drain(quiet=1.0) if (r := dhcp_reply(f))] == [
        (2, str(A2.ip), str(NET_A.gateway))]


def test_removal_leaves_nothing_behind(tmp_path: Path) -> None:
    with fabric(tmp_path) as (ns, plumbing):
        for net, nics in NICS.items():
            plumbing.ensure_network(net, nics)
            for n in nics:
                plumbing.ensure_nic(n)
        # idempotent: a replay (daemon restart) makes nothing twice
        plumbing.ensure_network(NET_A, NICS[NET_A])
        plumbing.ensure_nic(A1)
        inv = plumbing.inventory()
        assert sorted(inv.namespaces) == sorted(plumbing.netns(n) for n in (NET_A, NET_B))
        assert sorted(inv.bridges) == sorted([NET_A.bridge, NET_B.bridge])
        assert sorted(inv.taps) == sorted(n.tap for n in (A1, A2, B1, B2))
        assert len(inv.tables) == 6 and len(inv.dnsmasq_pids) == 2
        plumbing.remove_nic(A1)
        inv = plumbing.inventory()
        assert A1.tap not in inv.taps and f"netdev {A1.table}" not in inv.tables
        for net, nics in NICS.items():
            for n in nics:
                plumbing.remove_nic(n)
            plumbing.remove_network(net)
        inv = plumbing.inventory()
        assert inv.empty, inv
        assert namespaces_left() == [ns.name]  # the networks' namespaces went with them
        assert not any((tmp_path / "net-run").iterdir())


def test_payload_helper_reads_what_udp_frame_wrote() -> None:
    frame = udp_frame(BROADCAST, b"\x02" * 6, "10.0.0.2", "10.0.0.3", b"x" * 3)
    assert payload_of(frame) == b"xxx" and len(frame) == 60
    assert struct.unpack("!H", frame[12:14])[0] == 0x0800
