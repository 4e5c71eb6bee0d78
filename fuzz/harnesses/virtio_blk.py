"""virtio-blk: the request parser (framing, header, sector bounds, segments) and the
device over a real 1 MiB raw image, read-write and read-only. Oracles: an accepted IN/OUT
lies on the disk; the image never grows; a read-only image never changes."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from fuzz import rig
from fuzz.data import Data
from isovisor.devices.virtio import blk_request as br
from isovisor.devices.virtio.blk import VirtioBlk, open_disk
from isovisor.devices.virtio.blk_disk import DiskSpec
from isovisor.devices.virtio.chain import Descriptor

COVERS = ("virtio:virtio-blk",)
DISK_BYTES = 1 << 20
CAPACITY = DISK_BYTES // br.SECTOR_SIZE
_dir: tempfile.TemporaryDirectory[str] | None = None
_devs: dict[bool, VirtioBlk] = {}


def setup() -> None:
    global _dir
    _dir = tempfile.TemporaryDirectory(prefix="isovisor-fuzz-blk-")
    for ro in (False, True):
        path = Path(_dir.name) / f"disk-{int(ro)}.img"
        with path.open("wb") as f:
            f.write(b"\xa5" * DISK_BYTES)
        _devs[ro] = open_disk(DiskSpec(path=path, readonly=ro, serial="fuzz"),
                              rig.security_events())


def _digest(dev: VirtioBlk) -> tuple[int, str]:
    fd = dev.disk.fd
    size = os.fstat(fd).st_size
    return size, hashlib.sha1(os.pread(fd, DISK_BYTES, 0)).hexdigest()


def _parser(d: Data) -> None:
    descs = []
    for _ in range(d.u8() % 8):
        addr = rig.BUF + d.u16()
        length = d.u32() if d.flag() else d.u16()
        descs.append(Descriptor(addr, length, d.flag(), addr))
    limits = br.Limits(capacity=CAPACITY, readonly=d.flag(), discard=d.flag(),
                       write_zeroes=d.flag(), max_discard_sectors=1 << 12, max_discard_seg=4,
                       max_write_zeroes_sectors=1 << 10, max_write_zeroes_seg=2)
    framed = br.frame(descs)
    if isinstance(framed, br.Rejected):
        return
    req = br.parse(framed, d.take(br.HEADER_SIZE), limits)
    if isinstance(req, br.Rejected):
        return
    if req.type in (br.RequestType.IN, br.RequestType.OUT):
        assert req.offset + req.length <= CAPACITY * br.SECTOR_SIZE, \
            f"{req.type.name} at sector {req.sector} + {req.length} bytes passes the end"
        assert req.length % br.SECTOR_SIZE == 0
    if req.type in br.WRITE_TYPES:
        assert not limits.readonly, f"{req.type.name} accepted on a read-only disk"
    ranged = (br.RequestType.DISCARD, br.RequestType.WRITE_ZEROES)
    if req.type in ranged and br.segments_length_ok(req, limits) is None:
        seg = br.parse_segments(req, d.take(req.length % 4096), limits)
        if not isinstance(seg, br.Rejected):
            for s in seg.segments:
                assert s.offset + s.length <= CAPACITY * br.SECTOR_SIZE


def one_input(data: bytes) -> None:
    if not _devs:
        setup()
    d = Data(data)
    mode = d.u8()
    if mode % 3 == 0:
        _parser(d)
        return
    ro = bool(mode & 4)
    dev = _devs[ro]
    before = _digest(dev)
    rig.drive(dev, d)
    after = _digest(dev)
    assert after[0] == DISK_BYTES, f"the image grew to {after[0]} bytes"
    if ro:
        assert after == before, "a read-only image changed"
    elif after != before:  # restore the image for the next input (replayability)
        os.pwrite(dev.disk.fd, b"\xa5" * DISK_BYTES, 0)
