"""Two tenants, two VMs each, on tenant networks built by NetworkPlumbing (each network in
a namespace of its own, under a prefix this test made), both networks 10.91.0.0/24 and the
VMs' addresses the same in both: raw virtio-net guests
(tests/devices/virtio/guests/net_tenant.asm) send unicast, broadcast, multicast, ARP and
spoofed-source frames through their virtio-net devices and TAPs; receiving guests log
every frame that reaches them.

    tenant A: a-send (A1, 10.91.0.2) sends; a-recv (A2, 10.91.0.3) receives
    tenant B: b-send (B2, 10.91.0.3) sends; b-recv (B1, 10.91.0.2) receives

The receiver of the other tenant must log zero of a sender's frames; the receiver of the
same tenant exactly the legitimate ones (the spoofed ones die at the sender's TAP)."""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.devices.tap import open_tap
from isovisor.devices.virtio.mmio import VirtioMmioTransport
from isovisor.devices.virtio.net import VirtioNet
from isovisor.devices.virtio.slots import attach_virtio_mmio, virtio_mmio_slot
from isovisor.host.network.addressing import NicPlan
from isovisor.host.network.plumbing import NetworkPlumbing
from isovisor.kvm import Kvm
from isovisor.vmm.vm import Vm
from tests.devices.virtio.driver_guests import assemble
from tests.devices.virtio.netns import NetNs
from tests.network.fabric import fabric, inside, network, nic
from tests.network.frames import BROADCAST, arp_frame, mac_bytes, norm, udp_frame
from tests.vmm.rawguest import Recorder, raw_vm

pytestmark = pytest.mark.kvm

REPORT_PORT = 0x500
ALIVE, READY, TIMEOUT = 0x600DF00D, 0x0EAD0001, 0xDEAD0001
TABLE, LOG = 0x300000, 0x400010
# The same CIDR in both tenants (each network has a namespace of its own), and the same
# addresses: a tenant picks its range without knowing anyone else's.
NET_A = network("00000a00", "10.91.0.0/24")
NET_B = network("00000b00", "10.91.0.0/24")
A1 = nic("00000a01", NET_A, "02:aa:00:00:00:01", "10.91.0.2")
A2 = nic("00000a02", NET_A, "02:aa:00:00:00:02", "10.91.0.3")
B1 = nic("00000b01", NET_B, "02:bb:00:00:00:01", "10.91.0.2")
B2 = nic("00000b02", NET_B, "02:bb:00:00:00:02", "10.91.0.3")


def build(tmp_path: Path, role: int) -> bytes:
    out = tmp_path / f"net_tenant_{role}.bin"
    return assemble(out, "net_tenant", f"ROLE={role}").read_bytes()


class Guest:
    """A raw VM whose virtio-net (slot 0) is on NIC `plan`'s TAP in its network's
    namespace."""

    def __init__(self, kvm: Kvm, code: bytes, plumbing: NetworkPlumbing, plan: NicPlan
                 ) -> None:
        self.vm: Vm = raw_vm(kvm, code)
        self.rec = Recorder()
        self.vm.pio.register(REPORT_PORT, 4, self.rec, "report")
        tap = open_tap(plan.tap, netns=plumbing.netns(plan.network))
        self.net = VirtioNet(self.vm.security_events, tap, mac=mac_bytes(plan.mac))
        self.transport: VirtioMmioTransport = attach_virtio_mmio(
            self.vm, self.net, virtio_mmio_slot(0))

    @property
    def reports(self) -> list[int]:
        return [int.from_bytes(d, "little") for _, d in self.rec.writes]

    def wait_report(self, value: int, timeout: float = 120.0) -> list[int]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            vals = self.reports
            if value in vals or TIMEOUT in vals:
                assert TIMEOUT not in vals, [hex(v) for v in vals]
                return vals
            time.sleep(0.01)
        raise AssertionError(f"guest did not report {value:#x}: {[hex(v) for v in self.reports]}")

    def load_frames(self, frames: list[bytes]) -> None:
        mem = self.vm.mem
        mem.write_all(TABLE, len(frames).to_bytes(4, "little"))
        for i, frame in enumerate(frames):
            assert len(frame) <= 100
            entry = TABLE + 16 + 128 * i
            mem.write_all(entry, len(frame).to_bytes(4, "little"))
            mem.write_all(entry + 16, bytes(12) + frame)

    def logged(self) -> list[bytes]:
        mem = self.vm.mem
        count = mem.read_u32(LOG - 16)
        out = []
        for i in range(min(count, 64)):
            length = mem.read_u32(LOG + 128 * i)
            out.append(mem.read_exact(LOG + 128 * i + 16, 112)[12:length])
        assert count == len(out), f"log overflowed: {count} frames"
        return out

    def close(self) -> None:
        self.vm.stop()
        self.vm.wait(10)
        self.transport.close()
        self.vm.close()


@pytest.fixture
def plumbed(tmp_path: Path) -> Iterator[tuple[NetNs, NetworkPlumbing]]:
    with fabric(tmp_path) as (ns, plumbing):
        plumbing.ensure_network(NET_A, [A1, A2])
        plumbing.ensure_network(NET_B, [B1, B2])
        for plan in (A1, A2, B1, B2):
            plumbing.ensure_nic(plan)
        yield ns, plumbing


def m(plan: NicPlan) -> bytes:
    return mac_bytes(plan.mac)


@pytest.mark.timeout(180)
def test_cross_tenant_and_spoofed_frames_are_never_delivered(
    kvm: Kvm, tmp_path: Path, plumbed: tuple[NetNs, NetworkPlumbing]
) -> None:
    _, plumbing = plumbed
    ns_a, ns_b = inside(plumbing, NET_A), inside(plumbing, NET_B)
    a1, a2, b1, b2 = str(A1.ip), str(A2.ip), str(B1.ip), str(B2.ip)
    assert (a1, a2) == (b1, b2) and NET_A.cidr == NET_B.cidr
    gw_a = mac_bytes(ns_a.run("cat", f"/sys/class/net/{NET_A.bridge}/address").stdout.strip())
    a_legit = [
        udp_frame(m(A2), m(A1), a1, a2, b"a-unicast"),
        udp_frame(BROADCAST, m(A1), a1, "10.91.0.255", b"a-broadcast"),
        udp_frame(b"\x01\x00\x5e\x00\x00\x01", m(A1), a1, "224.0.0.1", b"a-multicast"),
        arp_frame(m(A1), m(A1), a1, a2),
        # aimed at tenant B's receiver by MAC (its IP is A1's own): flooded inside A's
        # network only
        udp_frame(m(B1), m(A1), a1, b1, b"a-to-b"),
    ]
    a_spoofed = [
        udp_frame(m(A2), m(A2), a2, a2, b"a-spoof-mac"),
        udp_frame(BROADCAST, m(B1), b1, "10.91.0.255", b"a-as-b-broadcast"),
        udp_frame(m(A2), m(A1), "10.91.0.77", a2, b"a-spoof-ip"),
        arp_frame(m(A1), m(A1), a2, a2),  # ARP: claims A2's address
        arp_frame(m(A1), m(A2), a1, a2),  # ARP sender MAC is not the frame's
    ]
    # To the host itself (its gateway address, and off the network through it): dropped
    # by the network's guard before any host socket or route sees them.
    a_to_host = [
        udp_frame(gw_a, m(A1), a1, str(NET_A.gateway), b"a-to-host"),
        udp_frame(gw_a, m(A1), a1, "10.92.0.1", b"a-routed-off-net"),
    ]
    b_legit = [
        udp_frame(BROADCAST, m(B2), b2, "10.91.0.255", b"b-broadcast"),
        udp_frame(m(B1), m(B2), b2, b1, b"b-unicast"),
        # aimed at tenant A's receiver by MAC (its IP is B2's own): flooded inside B's
        # network only, so B's receiver logs it and A's does not
        udp_frame(m(A2), m(B2), b2, a2, b"b-to-a"),
    ]
    b_spoofed = [
        udp_frame(BROADCAST, m(A1), a1, "10.91.0.255", b"b-as-a-broadcast"),
        udp_frame(m(A2), m(B2), a1, a2, b"b-as-b1-ip"),  # B1's (and A1's) address
        arp_frame(m(B2), m(B2), b1, b1),  # ARP: claims B1's address
    ]
    guests: list[Guest] = []
    # The test datagrams' port, on every host address of each network's namespace.
    listeners = [ns.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                 for ns in (ns_a, ns_b)]
    for listener in listeners:
        listener.bind(("0.0.0.0", 4000))
        listener.setblocking(False)
    try:
        recv_a, recv_b = (Guest(kvm, build(tmp_path, 2), plumbing, p) for p in (A2, B1))
        guests += [recv_a, recv_b]
        send_a, send_b = (Guest(kvm, build(tmp_path, 1), plumbing, p) for p in (A1, B2))
        guests += [send_a, send_b]
        send_a.load_frames(a_legit + a_spoofed + a_to_host)
        send_b.load_frames(b_legit + b_spoofed)
        for g in (recv_a, recv_b):
            g.vm.start()
        for g in (recv_a, recv_b):
            g.wait_report(READY)
        for g in (send_a, send_b):
            g.vm.start()
        assert send_a.wait_report(ALIVE)[-2:] == [len(a_legit + a_spoofed + a_to_host), ALIVE]
        assert send_b.wait_report(ALIVE)[-2:] == [len(b_legit + b_spoofed), ALIVE]
        # Every frame left its sender's virtio-net device for the TAP ...
        assert send_a.net.net_stats.tx_frames == len(a_legit + a_spoofed + a_to_host)
        assert send_b.net.net_stats.tx_frames == len(b_legit + b_spoofed)
        time.sleep(1.0)  # ... and had ample time to arrive anywhere it could
        got_a, got_b = recv_a.logged(), recv_b.logged()
        assert sorted(map(norm, got_a)) == sorted(map(norm, a_legit)), got_a
        assert sorted(map(norm, got_b)) == sorted(map(norm, b_legit)), got_b
        for listener in listeners:
            with pytest.raises(BlockingIOError):  # not even the broadcasts to port 4000
                listener.recvfrom(100)
        for g in guests:
            assert g.vm.security_events.events() == []
        # The senders' own TAP rules dropped each spoofed frame.
        for plan, spoofed in ((A1, a_spoofed), (B2, b_spoofed)):
            rules = inside(plumbing, plan.network).run(
                "nft", "list", "table", "netdev", plan.table).stdout
            assert sum(int(x) for x in re.findall(r"counter packets (\d+)", rules)) == len(
                spoofed)
    finally:
        for listener in listeners:
            listener.close()
        for g in guests:
            g.close()
