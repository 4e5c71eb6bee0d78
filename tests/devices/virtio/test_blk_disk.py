"""The virtio-blk backend: opening images (clear errors naming the path), locking,
preadv/pwritev with short transfers, O_DIRECT with and without the bounce buffer, discard
and write-zeroes."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.devices.virtio import blk_disk
from isovisor.devices.virtio.blk_disk import DIRECT_ALIGN, Disk, DiskError, DiskSpec
from isovisor.memory import GuestMemory
from isovisor.memory.layout import MiB
from tests.devices.virtio.blk_helpers import make_image, sector_bytes


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


def open_err(spec: DiskSpec) -> str:
    with pytest.raises(DiskError) as info:
        Disk.open(spec).close()
    return str(info.value)


def test_open_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    assert open_err(DiskSpec(missing)) == f"disk {missing} does not exist"
    assert "is a directory" in open_err(DiskSpec(tmp_path, readonly=True))
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    assert open_err(DiskSpec(odd)) == f"disk {odd} is 1000 bytes, not a multiple of 512"
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    assert open_err(DiskSpec(empty)) == f"disk {empty} is empty"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    try:
        assert "not a regular file or block device" in open_err(
            DiskSpec(Path("/dev/null"), readonly=True)
        )
        assert "cannot open" in open_err(DiskSpec(sock_path))
        assert "not a regular file" in open_err(DiskSpec(fifo, readonly=True))  # no hang
    finally:
        s.close()


def test_permission_error(tmp_path: Path) -> None:
    img = make_image(tmp_path / "ro.img", 8)
    img.chmod(0o444)
    if os.geteuid() == 0:
        # root ignores mode bits; a file on a read-only bind is out of reach here, so check
        # the message through a PermissionError from os.open instead.
        real = os.open

        def denied(path: object, flags: int, *a: object) -> int:
            raise PermissionError(errno.EACCES, "Permission denied")

        os.open = denied  # type: ignore[assignment]
        try:
            msg = open_err(DiskSpec(img))
        finally:
            os.open = real
    else:
        msg = open_err(DiskSpec(img))
    assert msg == f"disk {img}: permission denied (opening it read-write)"


def test_serial_must_be_short_printable_ascii(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="serial"):
        DiskSpec(tmp_path, serial="x" * 21)
    with pytest.raises(ValueError, match="serial"):
        DiskSpec(tmp_path, serial="é")
    assert DiskSpec(tmp_path, serial="x" * 20).serial == "x" * 20


def test_writable_disk_is_locked(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 8)
    a = Disk.open(DiskSpec(img))
    try:
        assert "in use" in open_err(DiskSpec(img))
        assert "in use" in open_err(DiskSpec(img, readonly=True))
    finally:
        a.close()
    b, c = Disk.open(DiskSpec(img, readonly=True)), Disk.open(DiskSpec(img, readonly=True))
    b.close()
    c.close()


def test_block_device_size_comes_from_lseek(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 24)
    d = Disk.open(DiskSpec(img))
    try:
        assert d.size == 24 * 512 and d.capacity == 24
    finally:
        d.close()


def test_short_transfers_resume(
    mem: GuestMemory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = make_image(tmp_path / "d.img", 16)
    d = Disk.open(DiskSpec(img))
    real = os.preadv
    calls: list[int] = []

    def short(fd: int, bufs: list[memoryview], off: int) -> int:
        calls.append(len(bufs))
        return real(fd, [bufs[0][: max(1, len(bufs[0]) // 2)]], off)

    monkeypatch.setattr(os, "preadv", short)
    views = [mem.view(0x10000, 700), mem.view(0x20000, 324), mem.view(0x30000, 1024)]
    try:
        d.read_into(views, 512, 2048, aligned=False)
    finally:
        for v in views:
            v.release()
        d.close()
    got = mem.read_exact(0x10000, 700) + mem.read_exact(0x20000, 324) + mem.read_exact(
        0x30000, 1024
    )
    assert got == b"".join(sector_bytes(s) for s in range(1, 5))
    assert len(calls) > 3


def test_eof_is_an_error(mem: GuestMemory, tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4)
    d = Disk.open(DiskSpec(img))
    try:
        os.truncate(img, 512)
        v = mem.view(0x10000, 1024)
        with pytest.raises(OSError, match="end of disk"):
            d.read_into([v], 1024, 1024, aligned=False)
        v.release()
    finally:
        d.close()


def direct_disk(tmp_path: Path, sectors: int = 64) -> Disk:
    img = make_image(tmp_path / "direct.img", sectors)
    try:
        return Disk.open(DiskSpec(img, direct=True))
    except DiskError as exc:
        if "O_DIRECT" in str(exc):
            pytest.skip(f"{tmp_path} does not support O_DIRECT")
        raise


def test_direct_needs_4k_multiple(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 9)
    msg = open_err(DiskSpec(img, direct=True))
    assert "O_DIRECT" in msg and str(img) in msg


def test_direct_aligned_goes_straight(mem: GuestMemory, tmp_path: Path) -> None:
    d = direct_disk(tmp_path)
    try:
        v = mem.view(0x10000, 8192)
        d.read_into([v], 8192, 8192, aligned=True)
        v.release()
        assert d.bounced == 0
        assert mem.read_exact(0x10000, 512) == sector_bytes(16)
        mem.write_all(0x10000, b"\x11" * 4096)
        v = mem.view(0x10000, 4096)
        d.write_from([v], 4096, 4096, aligned=True)
        v.release()
        assert d.bounced == 0
    finally:
        d.close()
    assert (tmp_path / "direct.img").read_bytes()[4096:8192] == b"\x11" * 4096


@pytest.mark.parametrize(
    ("offset", "sizes"),
    [(512, [512]), (1536, [100, 3000, 996]), (4096, [4096, 512]), (3584, [8192 + 1024])],
)
def test_direct_unaligned_bounces(
    mem: GuestMemory, tmp_path: Path, offset: int, sizes: list[int]
) -> None:
    d = direct_disk(tmp_path)
    total = sum(sizes)
    before = (tmp_path / "direct.img").read_bytes()
    addrs = [0x100000 + i * 0x10000 + 8 for i in range(len(sizes))]
    try:
        views = [mem.view(a, n) for a, n in zip(addrs, sizes, strict=True)]
        d.read_into(views, offset, total, aligned=False)
        got = b"".join(bytes(v) for v in views)
        assert got == before[offset : offset + total]
        for i, v in enumerate(views):
            v[:] = bytes([0x40 + i]) * len(v)
        d.write_from(views, offset, total, aligned=False)
        for v in views:
            v.release()
        assert d.bounced == 2
    finally:
        d.close()
    after = (tmp_path / "direct.img").read_bytes()
    want = b"".join(bytes([0x40 + i]) * n for i, n in enumerate(sizes))
    assert after[offset : offset + total] == want
    assert after[:offset] == before[:offset]  # the merged head and tail are intact
    assert after[offset + total :] == before[offset + total :]


def test_direct_bounce_spans_chunks(
    mem: GuestMemory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blk_disk, "BOUNCE_SIZE", 2 * DIRECT_ALIGN)
    d = direct_disk(tmp_path)
    before = (tmp_path / "direct.img").read_bytes()
    try:
        v = mem.view(0x100008, 5 * DIRECT_ALIGN)
        d.read_into([v], 512, len(v), aligned=False)
        assert bytes(v) == before[512 : 512 + 5 * DIRECT_ALIGN]
        v[:] = b"\x77" * len(v)
        d.write_from([v], 512, len(v), aligned=False)
        v.release()
        d.write_zeroes(1024, 512, unmap=False)
    finally:
        d.close()
    after = (tmp_path / "direct.img").read_bytes()
    assert after[512:1024] == b"\x77" * 512 and after[1024:1536] == bytes(512)
    assert after[1536 : 512 + 5 * DIRECT_ALIGN] == b"\x77" * (5 * DIRECT_ALIGN - 1024)
    assert after[: 512] == before[:512]


def test_discard_punches_and_zero_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = make_image(tmp_path / "d.img", 64)
    d = Disk.open(DiskSpec(img))
    try:
        d.discard(4096, 8192)
        d.write_zeroes(0, 1024, unmap=True)
        monkeypatch.setattr(blk_disk, "_fallocate", lambda *a: errno.EOPNOTSUPP)
        d.discard(16384, 4096)  # unsupported: a no-op, not an error
        d.write_zeroes(20480, 1536, unmap=False)
        monkeypatch.setattr(blk_disk, "_fallocate", lambda *a: errno.EIO)
        with pytest.raises(OSError):
            d.discard(0, 512)
    finally:
        d.close()
    data = img.read_bytes()
    assert data[:1024] == bytes(1024) and data[4096:12288] == bytes(8192)
    assert data[20480:22016] == bytes(1536)
    assert data[16384:16392] == (32).to_bytes(8, "little")  # untouched by the no-op


def test_readonly_disk_refuses_writes(mem: GuestMemory, tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 8)
    d = Disk.open(DiskSpec(img, readonly=True))
    try:
        v = mem.view(0x10000, 512)
        with pytest.raises(OSError, match="read-only"):
            d.write_from([v], 0, 512, aligned=False)
        v.release()
        with pytest.raises(OSError, match="read-only"):
            d.write_zeroes(0, 512, unmap=False)
        d.flush()  # allowed on an O_RDONLY fd
    finally:
        d.close()
