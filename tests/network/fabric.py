"""A tenant-network fabric for tests: NetworkPlumbing with a namespace prefix the test
made (tests/devices/virtio/netns.py: the network namespaces `NAME-ID` the plumbing makes
are removed with the test's own namespace NAME, everything in them, even after a crash),
and "wires": the guest end of a NIC's TAP, opened as a VMM would, to inject frames as
that guest and to collect what the guest would receive."""

from __future__ import annotations

import ipaddress
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from isovisor.devices.tap import VNET_HEADER_SIZE, Tap
from isovisor.host.network.addressing import NetworkPlan, NicPlan
from isovisor.host.network.plumbing import NetworkPlumbing
from tests.devices.virtio.netns import NetNs


def network(net_id: str, cidr: str) -> NetworkPlan:
    return NetworkPlan(net_id, ipaddress.IPv4Network(cidr))


def nic(nic_id: str, net: NetworkPlan, mac: str, ip: str) -> NicPlan:
    return NicPlan(nic_id, net, mac, ipaddress.IPv4Address(ip))


def inside(plumbing: NetworkPlumbing, net: NetworkPlan) -> NetNs:
    """The test helpers (run, call, links, ...) for network `net`'s own namespace."""
    return NetNs.existing(plumbing.netns(net))


class Wire:
    """The guest side of a NIC's TAP."""

    def __init__(self, plumbing: NetworkPlumbing, plan: NicPlan) -> None:
        self.plan = plan
        self.tap: Tap = inside(plumbing, plan.network).open_tap(plan.tap)
        self.received: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.tap.writev([bytes(VNET_HEADER_SIZE), frame])

    def drain(self, quiet: float = 0.3, timeout: float = 5.0) -> list[bytes]:
        """Collect frames until none came for `quiet` seconds; all received so far."""
        end = time.monotonic() + timeout
        buf = bytearray(65600)
        while time.monotonic() < end:
            ready, _, _ = select.select([self.tap.fd], [], [], quiet)
            if not ready:
                break
            while (n := self.tap.readv([buf])) is not None:
                self.received.append(bytes(buf[VNET_HEADER_SIZE:n]))
        return self.received

    def close(self) -> None:
        self.tap.close()


@contextmanager
def fabric(tmp_path: Path) -> Iterator[tuple[NetNs, NetworkPlumbing]]:
    with NetNs() as ns:
        yield ns, NetworkPlumbing(ns.name, tmp_path / "net-run")
