"""The encrypted virtio-blk backend: the image holds exactly the AES-XTS-256 (plain64)
ciphertext of what the guest wrote, reads decrypt, WRITE_ZEROES writes encrypted zeros,
DISCARD punches nothing; and a real guest (guests/blk_driver.asm under KVM) writes its
pattern through virtio-blk and reads it back while the host file never holds it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isovisor.devices.diskcrypt.encrypted_disk import EncryptedDisk
from isovisor.devices.diskcrypt.xts import SectorCipher
from isovisor.devices.virtio.blk import open_disk
from isovisor.devices.virtio.blk_disk import DiskError, DiskSpec
from isovisor.kvm import Kvm
from tests.devices.diskcrypt.test_xts import openssl_xts

SECTORS = 64
PATTERN = b"".join(((i * 0x01000193 + 7) & 0xFFFFFFFF).to_bytes(4, "little")
                   for i in range(256))  # what blk_driver.asm writes at sector 1


def _disk(tmp_path: Path, key: bytes, sectors: int = SECTORS) -> EncryptedDisk:
    image = tmp_path / "enc.img"
    image.write_bytes(bytes(sectors * 512))
    disk = EncryptedDisk.open(DiskSpec(image, key=key))
    assert isinstance(disk, EncryptedDisk)
    return disk


def test_writes_land_as_plain64_ciphertext_and_read_back(tmp_path: Path) -> None:
    key = os.urandom(64)
    disk = _disk(tmp_path, key)
    try:
        plain = os.urandom(8 * 512)
        # the guest's data in three buffers of odd sizes (framing is the guest's choice)
        src = bytearray(plain)
        views = [memoryview(src)[:700], memoryview(src)[700:3000], memoryview(src)[3000:]]
        disk.write_from(views, 5 * 512, len(plain), False)
        on_disk = (tmp_path / "enc.img").read_bytes()
        assert on_disk[5 * 512 : 13 * 512] == openssl_xts(key, 5, plain, encrypt=True)
        assert plain not in on_disk
        for split in ([len(plain)], [1, 511, 3000, len(plain) - 3512]):
            dst = bytearray(len(plain))
            out, pos = [], 0
            for n in split:
                out.append(memoryview(dst)[pos : pos + n])
                pos += n
            disk.read_into(out, 5 * 512, len(plain), False)
            assert bytes(dst) == plain
    finally:
        disk.close()


def test_write_zeroes_writes_encrypted_zeros_and_discard_keeps_the_ciphertext(
        tmp_path: Path) -> None:
    key = os.urandom(64)
    disk = _disk(tmp_path, key)
    try:
        disk.write_from([memoryview(os.urandom(4096))], 0, 4096, False)
        before = (tmp_path / "enc.img").read_bytes()
        disk.discard(0, 4096)
        assert (tmp_path / "enc.img").read_bytes() == before  # no hole, nothing revealed
        disk.write_zeroes(0, 2048, unmap=True)
        data = (tmp_path / "enc.img").read_bytes()
        assert data[:2048] == openssl_xts(key, 0, bytes(2048), encrypt=True)
        assert data[:2048] != bytes(2048)
        dst = bytearray(2048)
        disk.read_into([memoryview(dst)], 0, 2048, False)
        assert dst == bytes(2048)
    finally:
        disk.close()


def test_a_wrong_key_reads_noise(tmp_path: Path) -> None:
    disk = _disk(tmp_path, os.urandom(64))
    disk.write_from([memoryview(PATTERN)], 512, len(PATTERN), False)
    disk.close()
    other = EncryptedDisk.open(DiskSpec(tmp_path / "enc.img", key=os.urandom(64)))
    try:
        dst = bytearray(len(PATTERN))
        other.read_into([memoryview(dst)], 512, len(PATTERN), False)
        assert bytes(dst) != PATTERN
    finally:
        other.close()


@pytest.mark.parametrize(("spec_kw", "msg"), [
    ({"key": b"short"}, "64 bytes"),
    ({"key": bytes(64)}, "must differ"),
    ({"key": os.urandom(64), "direct": True}, "O_DIRECT"),
])
def test_unusable_keys_and_options_are_refused_naming_the_disk(
        tmp_path: Path, spec_kw: dict[str, object], msg: str) -> None:
    image = tmp_path / "x.img"
    image.write_bytes(bytes(4096))
    with pytest.raises(DiskError, match=msg) as err:
        EncryptedDisk.open(DiskSpec(image, **spec_kw))  # type: ignore[arg-type]
    assert str(image) in str(err.value)


def test_the_key_never_shows_in_a_repr(tmp_path: Path) -> None:
    key = bytes(range(64))
    assert key.hex() not in repr(DiskSpec(tmp_path / "x", key=key))
    assert repr(key) not in repr(DiskSpec(tmp_path / "x", key=key))


@pytest.mark.kvm
def test_a_guest_writes_and_reads_its_pattern_and_the_host_file_never_holds_it(
        kvm: Kvm, tmp_path: Path) -> None:
    from tests.devices.virtio.test_blk_guest import ALIVE, build
    from tests.devices.virtio.test_rng_guest import REPORT_PORT, Report
    from tests.vmm.rawguest import raw_vm

    key = os.urandom(64)
    image = tmp_path / "enc.img"
    image.write_bytes(SectorCipher(key).encrypt(0, bytes(SECTORS * 512)))
    vm = raw_vm(kvm, build(tmp_path, 0))
    report = Report()
    vm.pio.register(REPORT_PORT, 4, report.rec, "report")
    blk = open_disk(DiskSpec(image, serial="isovisor-test", key=key), vm.security_events)
    from isovisor.devices.virtio.slots import attach_virtio_mmio, virtio_mmio_slot
    transport = attach_virtio_mmio(vm, blk, virtio_mmio_slot(0))
    vm.start()
    try:
        vals = report.wait_end()
    finally:
        vm.stop()
        vm.wait(10)
        transport.close()
        blk.close()
        vm.close()
    # (status, used len) of OUT 1024 bytes, FLUSH, IN 1024 bytes, GET_ID; then 0: the
    # guest read back exactly what it wrote
    assert vals[7:16] == [0, 1, 0, 1, 0, 1025, 0, 21, 0], [hex(v) for v in vals]
    assert vals[-1] == ALIVE
    data = image.read_bytes()
    for i in range(0, len(PATTERN) - 8, 4):  # no 8-byte window of the pattern anywhere
        assert PATTERN[i : i + 8] not in data
    assert SectorCipher(key).decrypt(1, data[512:1536]) == PATTERN


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["r", "w", "z", "d"]), st.integers(0, 15),
                              st.integers(1, 4), st.lists(st.integers(1, 700), max_size=3)),
                    min_size=1, max_size=12))
def test_the_backend_behaves_like_a_plain_disk(ops: list[tuple[str, int, int, list[int]]]
                                                ) -> None:
    """Random reads, writes, write-zeroes and discards, the guest's buffers cut at random
    points: the guest sees what a plain disk would show, the file is always exactly the
    plain64 ciphertext of that content."""
    import tempfile

    key = os.urandom(64)
    cipher = SectorCipher(key)
    model = bytearray(16 * 512)
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "enc.img"
        image.write_bytes(cipher.encrypt(0, bytes(model)))
        disk = EncryptedDisk.open(DiskSpec(image, key=key))
        try:
            for kind, sector, count, cuts in ops:
                count = min(count, 16 - sector)
                if count <= 0:
                    continue
                off, n = sector * 512, count * 512
                if kind == "w":
                    data = bytearray(os.urandom(n))
                    disk.write_from(_cut(data, cuts), off, n, False)
                    model[off : off + n] = data
                elif kind == "z":
                    disk.write_zeroes(off, n, unmap=bool(cuts))
                    model[off : off + n] = bytes(n)
                elif kind == "d":
                    disk.discard(off, n)  # a hint: the content stays
                else:
                    dst = bytearray(n)
                    disk.read_into(_cut(dst, cuts), off, n, False)
                    assert dst == model[off : off + n]
            assert image.read_bytes() == cipher.encrypt(0, bytes(model))
        finally:
            disk.close()


def _cut(buf: bytearray, cuts: list[int]) -> list[memoryview]:
    views, pos = [], 0
    for c in cuts:
        if pos + c >= len(buf):
            break
        views.append(memoryview(buf)[pos : pos + c])
        pos += c
    views.append(memoryview(buf)[pos:])
    return views
