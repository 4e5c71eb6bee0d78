"""virtio-rng end to end under KVM: a guest driver (guests/rng_driver.asm) negotiates,
sets up a queue, posts a buffer and notifies through the ioeventfd; a hostile variant
drives the device to NEEDS_RESET while the VM keeps running."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.device import DeviceState
from isovisor.devices.virtio.mmio import VirtioMmioTransport
from isovisor.devices.virtio.rng import VirtioRng
from isovisor.devices.virtio.slots import attach_virtio_mmio, virtio_mmio_slot
from isovisor.kvm import Kvm
from isovisor.vmm.vcpu import VcpuState
from isovisor.vmm.vm import Vm
from tests.devices.virtio.driver_guests import assemble
from tests.vmm.rawguest import Recorder, raw_vm

pytestmark = pytest.mark.kvm

REPORT_PORT = 0x500
BUF = 0x203000
ALIVE = 0x600DF00D
TIMEOUT = 0xDEAD0001


def build(tmp_path: Path, hostile: int) -> bytes:
    out = tmp_path / f"rng_driver_{hostile}.bin"
    return assemble(out, "rng_driver", f"HOSTILE={hostile}").read_bytes()


class Report:
    """Collects the guest's `out 0x500, eax` values."""

    def __init__(self) -> None:
        self.rec = Recorder()

    @property
    def values(self) -> list[int]:
        return [int.from_bytes(d, "little") for _, d in self.rec.writes]

    def wait_end(self, timeout: float = 60.0) -> list[int]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            vals = self.values
            if vals and vals[-1] in (ALIVE, TIMEOUT):
                return vals
            time.sleep(0.01)
        raise AssertionError(f"guest did not finish; reported {[hex(v) for v in self.values]}")


def run(kvm: Kvm, code: bytes) -> tuple[Vm, VirtioMmioTransport, VirtioRng, Report]:
    vm = raw_vm(kvm, code)
    report = Report()
    vm.pio.register(REPORT_PORT, 4, report.rec, "report")
    rng = VirtioRng(vm.security_events)
    transport = attach_virtio_mmio(vm, rng, virtio_mmio_slot(0))
    vm.start()
    return vm, transport, rng, report


def shutdown(vm: Vm, transport: VirtioMmioTransport) -> None:
    vm.stop()
    vm.wait(10)
    transport.close()  # stop the device's I/O thread before guest memory goes
    vm.close()


def test_guest_gets_random_bytes_through_ioeventfd(kvm: Kvm, tmp_path: Path) -> None:
    code = build(tmp_path, 0)
    buffers = []
    for _ in range(2):
        vm, transport, rng, report = run(kvm, code)
        try:
            vals = report.wait_end()
            assert vals == [
                c.MMIO_MAGIC,
                2,
                c.DEVICE_ID_ENTROPY,
                1,  # VIRTIO_F_VERSION_1 in the high feature word
                0x0B,  # FEATURES_OK accepted
                256,  # QueueNumMax
                0,  # used id
                64,  # used len
                c.INT_USED_BUFFER,
                ALIVE,
            ], [hex(v) for v in vals]
            buffers.append(vm.mem.read_exact(BUF, 64))
            # The notify was an ioeventfd: it never went through the vCPU thread and bus.
            assert transport.stats.fallback_notifies == 0
            assert rng.stats.notifications >= 1
            assert rng.rng_stats.requests == 1 and rng.rng_stats.bytes == 64
            assert transport.stats.interrupts >= 1  # via the irqfd
            assert transport.interrupt_status == 0  # the guest ACKed it
            assert vm.security_events.events() == []
        finally:
            shutdown(vm, transport)
    a, b = buffers
    assert a != bytes(64) and b != bytes(64)
    assert a != b


@pytest.mark.parametrize(
    ("hostile", "detail"), [(1, "hops"), (2, "not RAM")], ids=["self-loop", "outside-ram"]
)
def test_hostile_guest_needs_reset_and_vm_keeps_running(
    kvm: Kvm, tmp_path: Path, hostile: int, detail: str
) -> None:
    vm, transport, rng, report = run(kvm, build(tmp_path, hostile))
    try:
        vals = report.wait_end()
        assert vals[-2:] == [0x4F, ALIVE], [hex(v) for v in vals]  # DRIVER_OK|NEEDS_RESET
        assert rng.state is DeviceState.BROKEN
        (ev,) = vm.security_events.events()
        assert ev.kind == "virtio-needs-reset" and ev.source == f"virtio-rng@{0xD0000000:#x}"
        assert detail in ev.detail
        assert transport.interrupt_status & c.INT_CONFIG_CHANGE
        # The VM is still running: the guest reported ALIVE after the device broke.
        assert vm.stop_event is None
        assert all(v.state is VcpuState.RUNNING for v in vm.vcpus)
        assert vm.mem.read_exact(BUF, 64) == bytes(64)
    finally:
        shutdown(vm, transport)
