"""virtio-net end to end under KVM: a guest driver (guests/net_driver.asm) negotiates, sets
up both queues, sends a frame through the TAP to a host packet socket in a private network
namespace, and receives the host's reply; hostile variants break the net device while an
rng beside it keeps serving the same guest."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.devices.tap import Tap
from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.device import DeviceState
from isovisor.devices.virtio.mmio import VirtioMmioTransport
from isovisor.devices.virtio.net import VirtioNet
from isovisor.devices.virtio.rng import VirtioRng
from isovisor.devices.virtio.slots import attach_virtio_mmio, virtio_mmio_slot
from isovisor.kvm import Kvm
from isovisor.vmm.vcpu import VcpuState
from isovisor.vmm.vm import Vm
from tests.devices.virtio.driver_guests import assemble
from tests.devices.virtio.net_helpers import MAC, TapPeer, tap_in_netns
from tests.devices.virtio.netns import NetNs, eth_frame
from tests.vmm.rawguest import Recorder, raw_vm

pytestmark = pytest.mark.kvm

REPORT_PORT = 0x500
ALIVE = 0x600DF00D
TIMEOUT = 0xDEAD0001
HOST_MAC = bytes.fromhex("02000000fe01")
NET_SOURCE = f"virtio-net@{0xD0000000:#x}"


def build(tmp_path: Path, hostile: int) -> bytes:
    out = tmp_path / f"net_driver_{hostile}.bin"
    return assemble(out, "net_driver", f"HOSTILE={hostile}").read_bytes()


class Report:
    def __init__(self) -> None:
        self.rec = Recorder()

    @property
    def values(self) -> list[int]:
        return [int.from_bytes(d, "little") for _, d in self.rec.writes]

    def wait_end(self, timeout: float = 180.0) -> list[int]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            vals = self.values
            if vals and vals[-1] in (ALIVE, TIMEOUT):
                return vals
            time.sleep(0.01)
        raise AssertionError(f"guest did not finish; reported {[hex(v) for v in self.values]}")


class Guest:
    """A raw VM with virtio-net (slot 0) on `tap` and virtio-rng (slot 1)."""

    def __init__(self, kvm: Kvm, code: bytes, tap: Tap) -> None:
        self.vm: Vm = raw_vm(kvm, code)
        self.report = Report()
        self.vm.pio.register(REPORT_PORT, 4, self.report.rec, "report")
        self.net = VirtioNet(self.vm.security_events, tap, mac=MAC)
        self.rng = VirtioRng(self.vm.security_events)
        self.transports: list[VirtioMmioTransport] = [
            attach_virtio_mmio(self.vm, self.net, virtio_mmio_slot(0)),
            attach_virtio_mmio(self.vm, self.rng, virtio_mmio_slot(1)),
        ]

    def close(self) -> None:
        self.vm.stop()
        self.vm.wait(10)
        for t in self.transports:
            t.close()  # stop the device I/O threads before guest memory goes
        self.vm.close()


@pytest.fixture
def tap() -> Iterator[tuple[NetNs, Tap, TapPeer]]:
    with tap_in_netns() as t:
        yield t


def echo_once(peer: TapPeer, seen: list[bytes], timeout: float = 120.0) -> None:
    """Answer the guest's first test frame with "isovisor-pong" to its source address."""
    try:
        frame = peer.recv_from_guest(timeout)
    except (TimeoutError, OSError):
        return
    seen.append(frame)
    peer.sock.send(eth_frame(frame[6:12], HOST_MAC, b"isovisor-pong"))


def test_guest_frame_round_trip_through_the_tap(
    kvm: Kvm, tmp_path: Path, tap: tuple[NetNs, Tap, TapPeer]
) -> None:
    _, t, peer = tap
    seen: list[bytes] = []
    responder = threading.Thread(target=echo_once, args=(peer, seen), daemon=True)
    responder.start()
    g = Guest(kvm, build(tmp_path, 0), t)
    try:
        g.vm.start()
        vals = g.report.wait_end()
        assert vals == [
            c.MMIO_MAGIC,
            2,
            c.DEVICE_ID_NET,
            g.net.avail_features & 0xFFFF_FFFF,
            0x0B,  # FEATURES_OK accepted
            1,  # VIRTIO_NET_S_LINK_UP
            0,  # transmit used id
            0,  # transmit used len: the device writes nothing
            12 + 60,  # receive used len: header + the 60-byte reply
            1,  # num_buffers
            0xB588,  # ethertype 0x88B5 as stored
            1,  # payload "isovisor-pong"
            c.INT_USED_BUFFER,
            ALIVE,
        ], [hex(v) for v in vals]
        responder.join(5)
        (frame,) = seen
        assert frame[:6] == b"\xff" * 6 and frame[6:12] == MAC
        assert frame[14:27] == b"isovisor-ping" and len(frame) == 60
        # Notifies came by ioeventfd, interrupts left by irqfd.
        assert g.transports[0].stats.fallback_notifies == 0
        assert g.net.net_stats.tx_frames == 1 and g.net.net_stats.rx_frames >= 1
        assert g.vm.security_events.events() == []
    finally:
        g.close()


@pytest.mark.parametrize(
    ("hostile", "detail"),
    [(1, "hops"), (2, "not RAM"), (3, "runs past RAM")],
    ids=["tx-self-loop", "rx-outside-ram", "tx-huge-length"],
)
def test_hostile_guest_breaks_only_the_net_device(
    kvm: Kvm, tmp_path: Path, tap: tuple[NetNs, Tap, TapPeer], hostile: int, detail: str
) -> None:
    g = Guest(kvm, build(tmp_path, hostile), tap[1])
    try:
        g.vm.start()
        vals = g.report.wait_end()
        # DRIVER_OK|NEEDS_RESET, then the rng filled its 64-byte buffer, then ALIVE.
        assert vals[-3:] == [0x4F, 64, ALIVE], [hex(v) for v in vals]
        assert g.net.state is DeviceState.BROKEN
        assert g.rng.state is DeviceState.ACTIVE and g.rng.rng_stats.requests == 1
        (ev,) = g.vm.security_events.events()
        assert ev.kind == "virtio-needs-reset" and ev.source == NET_SOURCE
        assert detail in ev.detail
        assert g.transports[0].interrupt_status & c.INT_CONFIG_CHANGE
        assert g.vm.stop_event is None
        assert all(v.state is VcpuState.RUNNING for v in g.vm.vcpus)
        assert g.net.net_stats.tx_frames == 0
    finally:
        g.close()
