"""virtio-vsock end to end under KVM: a guest driver (guests/vsock_driver.asm) connects to
host port 5000, sends "ping", receives the "pong" a host Unix server at `<uds>_5000`
answers, and closes cleanly; hostile variants break the device while the VM and a
virtio-rng beside it keep running."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from isovisor.devices.virtio.device import DeviceState
from isovisor.devices.virtio.mmio import VirtioMmioTransport
from isovisor.devices.virtio.rng import VirtioRng
from isovisor.devices.virtio.slots import attach_virtio_mmio, virtio_mmio_slot
from isovisor.devices.virtio.vsock import VirtioVsock, VsockSpec, open_vsock
from isovisor.kvm import Kvm
from isovisor.vmm.vcpu import VcpuState
from isovisor.vmm.vm import Vm
from tests.devices.virtio.driver_guests import assemble
from tests.vmm.rawguest import Recorder, raw_vm

pytestmark = pytest.mark.kvm

REPORT_PORT = 0x500
PORT = 5000
CID = 3
ALIVE = 0x600DF00D
TIMEOUT = 0xDEAD0001


def build(tmp_path: Path, hostile: int) -> bytes:
    out = tmp_path / f"vsock_driver_{hostile}.bin"
    return assemble(out, "vsock_driver", f"HOSTILE={hostile}", f"PORT={PORT}").read_bytes()


class Report:
    def __init__(self) -> None:
        self.rec = Recorder()

    @property
    def values(self) -> list[int]:
        return [int.from_bytes(d, "little") for _, d in self.rec.writes]

    def wait_end(self, timeout: float = 90.0) -> list[int]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            vals = self.values
            if vals and vals[-1] in (ALIVE, TIMEOUT):
                return vals
            time.sleep(0.01)
        raise AssertionError(f"guest did not finish; reported {[hex(v) for v in self.values]}")


class PongServer:
    """The host service at <uds>_5000: answers "ping" with "pong", then records EOF."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.sock.settimeout(90)
        self.got = b""
        self.eof = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            with conn:
                conn.settimeout(90)
                while len(self.got) < 4:
                    chunk = conn.recv(4 - len(self.got))
                    if not chunk:
                        return
                    self.got += chunk
                conn.sendall(b"pong")
                self.eof = conn.recv(16) == b""
        except BaseException as exc:  # reported by the test
            self.error = exc

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def run(
    kvm: Kvm, code: bytes, uds: Path, with_rng: bool
) -> tuple[Vm, list[VirtioMmioTransport], VirtioVsock, VirtioRng | None, Report]:
    vm = raw_vm(kvm, code)
    report = Report()
    vm.pio.register(REPORT_PORT, 4, report.rec, "report")
    vsock = open_vsock(VsockSpec(CID, uds), vm.security_events)
    transports = [attach_virtio_mmio(vm, vsock, virtio_mmio_slot(0))]
    rng = None
    if with_rng:
        rng = VirtioRng(vm.security_events)
        transports.append(attach_virtio_mmio(vm, rng, virtio_mmio_slot(1)))
    vm.start()
    return vm, transports, vsock, rng, report


def shutdown(vm: Vm, transports: list[VirtioMmioTransport], vsock: VirtioVsock) -> None:
    vm.stop()
    vm.wait(10)
    for t in transports:
        t.close()  # stop the I/O threads before guest memory goes
    vsock.close()
    vm.close()


def test_guest_round_trip_to_a_host_unix_socket(kvm: Kvm, tmp_path: Path) -> None:
    uds = tmp_path / "v.sock"
    server = PongServer(tmp_path / f"v.sock_{PORT}")
    vm, transports, vsock, _, report = run(kvm, build(tmp_path, 0), uds, with_rng=False)
    try:
        vals = report.wait_end()
        assert vals == [
            19,  # DeviceID (§5.10.1)
            CID,  # guest_cid from the config space
            0x0B,  # FEATURES_OK accepted
            0x0002_0001,  # RESPONSE (stream)
            0x0005_0001,  # RW
            4,
            int.from_bytes(b"pong", "little"),
            0x0003_0001,  # RST after our SHUTDOWN(RCV|SEND)
            ALIVE,
        ], [hex(v) for v in vals]
        server.thread.join(10)
        assert server.error is None
        assert server.got == b"ping" and server.eof  # the guest's shutdown reached the host
        assert transports[0].stats.fallback_notifies == 0  # notifies came by ioeventfd
        assert vsock.vsock_stats.guest_connects == 1 and vsock.muxer is not None
        assert vsock.muxer.conns == {}
        assert vm.security_events.events() == []
    finally:
        shutdown(vm, transports, vsock)
        server.close()
    assert not uds.exists()  # the listening socket is removed at teardown


@pytest.mark.parametrize(
    ("hostile", "detail"),
    [(1, "guest's CID is 3"), (2, "hops")],
    ids=["spoofed-src-cid", "tx-loop"],
)
def test_hostile_guest_breaks_vsock_only(
    kvm: Kvm, tmp_path: Path, hostile: int, detail: str
) -> None:
    vm, transports, vsock, rng, report = run(
        kvm, build(tmp_path, hostile), tmp_path / "v.sock", with_rng=True
    )
    try:
        vals = report.wait_end()
        assert vals[:3] == [19, CID, 0x0B]
        assert vals[3:] == [0x4F, 16, ALIVE], [hex(v) for v in vals]  # rng served 16 bytes
        assert vsock.state is DeviceState.BROKEN
        assert rng is not None and rng.state is DeviceState.ACTIVE
        (ev,) = vm.security_events.events()
        assert ev.kind == "virtio-needs-reset" and ev.source == f"virtio-vsock@{0xD0000000:#x}"
        assert detail in ev.detail
        assert vm.stop_event is None
        assert all(v.state is VcpuState.RUNNING for v in vm.vcpus)
    finally:
        shutdown(vm, transports, vsock)
