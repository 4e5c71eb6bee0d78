"""virtio-blk end to end under KVM: a guest driver (guests/blk_driver.asm) writes a pattern,
flushes, reads it back and checks it, and asks for the serial, all through ioeventfd
notifies and the device's I/O thread; hostile variants break the device (NEEDS_RESET and a
security event) while the VM, the transport and a virtio-rng beside it keep working."""

from __future__ import annotations

from pathlib import Path

import pytest

from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.blk import F_BLK_SIZE, F_DISCARD, F_FLUSH, VirtioBlk, open_disk
from isovisor.devices.virtio.blk_disk import DiskSpec
from isovisor.devices.virtio.device import DeviceState
from isovisor.devices.virtio.mmio import VirtioMmioTransport
from isovisor.devices.virtio.rng import VirtioRng
from isovisor.devices.virtio.slots import attach_virtio_mmio, virtio_mmio_slot
from isovisor.kvm import Kvm
from isovisor.vmm.vcpu import VcpuState
from isovisor.vmm.vm import Vm
from tests.devices.virtio.blk_helpers import make_image, sector_bytes
from tests.devices.virtio.driver_guests import assemble
from tests.devices.virtio.test_rng_guest import ALIVE, REPORT_PORT, Report
from tests.vmm.rawguest import raw_vm

pytestmark = pytest.mark.kvm

LIVE = 0x4C495645
SECTORS = 64


def build(tmp_path: Path, hostile: int) -> bytes:
    out = tmp_path / f"blk_driver_{hostile}.bin"
    return assemble(out, "blk_driver", f"HOSTILE={hostile}").read_bytes()


class Guest:
    def __init__(self, kvm: Kvm, code: bytes, image: Path) -> None:
        self.vm: Vm = raw_vm(kvm, code)
        self.report = Report()
        self.vm.pio.register(REPORT_PORT, 4, self.report.rec, "report")
        self.blk: VirtioBlk = open_disk(
            DiskSpec(image, serial="isovisor-test"), self.vm.security_events
        )
        self.rng = VirtioRng(self.vm.security_events)
        self.transports: list[VirtioMmioTransport] = [
            attach_virtio_mmio(self.vm, self.blk, virtio_mmio_slot(0)),
            attach_virtio_mmio(self.vm, self.rng, virtio_mmio_slot(1)),
        ]
        self.vm.start()

    def close(self) -> None:
        self.vm.stop()
        self.vm.wait(10)
        for t in self.transports:
            t.close()
        self.blk.close()
        self.vm.close()


def test_guest_writes_flushes_reads_back(kvm: Kvm, tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", SECTORS)
    g = Guest(kvm, build(tmp_path, 0), image)
    try:
        vals = g.report.wait_end()
        features = F_FLUSH | F_BLK_SIZE | F_DISCARD
        assert vals[:3] == [c.MMIO_MAGIC, 2, c.DEVICE_ID_BLOCK], [hex(v) for v in vals]
        assert vals[3] & features == features
        assert vals[4:7] == [0x0B, SECTORS, 256]
        # (status, used len) of OUT 1024 bytes, FLUSH, IN 1024 bytes, GET_ID 20 bytes
        assert vals[7:15] == [0, 1, 0, 1, 0, 1025, 0, 21], [hex(v) for v in vals]
        assert vals[15] == 0  # the data read back is the data written
        assert vals[16] == int.from_bytes(b"isov", "little")
        assert vals[17] == ALIVE
        st = g.blk.blk_stats
        assert (st.writes, st.flushes, st.reads, st.get_ids) == (1, 1, 1, 1)
        assert g.transports[0].stats.fallback_notifies == 0  # notifies came by ioeventfd
        assert g.vm.security_events.events() == []
    finally:
        g.close()
    data = image.read_bytes()
    pattern = b"".join(((i * 0x01000193 + 7) & 0xFFFFFFFF).to_bytes(4, "little")
                       for i in range(256))
    assert data[512:1536] == pattern  # on the host's disk after the guest's flush
    assert data[:512] == sector_bytes(0) and data[1536:2048] == sector_bytes(3)


@pytest.mark.parametrize(
    ("hostile", "detail"),
    [(1, "hops"), (2, "not RAM"), (3, "RAM"), (4, "outside the queue"),
     (5, "descriptor table"), (6, "available idx")],
    ids=["loop", "outside-ram", "huge-length", "bad-head-index", "ring-over-mmio",
         "avail-idx-jump"],
)
def test_hostile_guest_breaks_only_the_blk_device(
    kvm: Kvm, tmp_path: Path, hostile: int, detail: str
) -> None:
    image = make_image(tmp_path / "disk.img", SECTORS)
    before = image.read_bytes()
    g = Guest(kvm, build(tmp_path, hostile), image)
    try:
        vals = g.report.wait_end()
        tail = [hex(v) for v in vals]
        assert vals[-4] & c.STATUS_DEVICE_NEEDS_RESET, tail
        assert vals[-3:] == [16, LIVE, ALIVE], tail  # the rng served, the transport answers
        if hostile != 5:  # a bad ring layout is refused before the device ever runs
            assert g.blk.state is DeviceState.BROKEN
        (ev,) = g.vm.security_events.events()
        assert ev.kind == "virtio-needs-reset" and ev.source == f"virtio-blk@{0xD0000000:#x}"
        assert detail in ev.detail, ev.detail
        assert g.rng.rng_stats.requests == 1 and g.rng.state is DeviceState.ACTIVE
        assert g.vm.stop_event is None
        assert all(v.state is VcpuState.RUNNING for v in g.vm.vcpus)
    finally:
        g.close()
    assert image.read_bytes() == before

