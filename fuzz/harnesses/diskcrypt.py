"""Encrypted virtio-blk: the native AES-XTS library (isovisor/devices/diskcrypt/
xts_native.c) with guest-controlled sectors and lengths, three ways: the cipher's calls
with any sector, length and output size (valid ones must equal OpenSSL's per-sector XTS
and leave the bytes around the output alone; others must be refused, writing nothing);
the encrypted disk's reads at any sector range of a 1 MiB image into guest buffers cut
anywhere (they decrypt exactly what the file holds); and the virtio-blk device
over that image with fuzzed rings (the image never grows)."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fuzz import rig
from fuzz.data import Data
from isovisor.devices.diskcrypt.encrypted_disk import EncryptedDisk
from isovisor.devices.diskcrypt.xts import SECTOR_SIZE, SectorCipher
from isovisor.devices.virtio.blk import VirtioBlk, open_disk
from isovisor.devices.virtio.blk_disk import DiskSpec

COVERS = ("virtio:virtio-blk",)
DISK_BYTES = 1 << 20
CAPACITY = DISK_BYTES // SECTOR_SIZE
KEY = bytes(range(1, 65))  # fixed: replayable
U64_MAX = (1 << 64) - 1
GUARD = b"\xee" * 32
_dir: tempfile.TemporaryDirectory[str] | None = None
_state: dict[str, object] = {}


def _reference(sector: int, data: bytes, encrypt: bool) -> bytes:
    out = b""
    for i in range(len(data) // SECTOR_SIZE):
        c = Cipher(algorithms.AES(KEY), modes.XTS((sector + i).to_bytes(16, "little")))
        ctx = c.encryptor() if encrypt else c.decryptor()
        out += ctx.update(data[i * SECTOR_SIZE : (i + 1) * SECTOR_SIZE]) + ctx.finalize()
    return out


def setup() -> None:
    global _dir
    _dir = tempfile.TemporaryDirectory(prefix="isovisor-fuzz-diskcrypt-")
    path = Path(_dir.name) / "enc.img"
    image = SectorCipher(KEY).encrypt(0, b"\xa5" * DISK_BYTES)
    path.write_bytes(image)
    _state["image"] = image
    _state["cipher"] = SectorCipher(KEY)
    _state["dev"] = open_disk(DiskSpec(path=path, serial="fuzz", key=KEY),
                              rig.security_events())


def _calls(d: Data, c: SectorCipher) -> None:
    sector = d.u64() if d.flag() else d.u16()
    n = d.u16() % (8 * SECTOR_SIZE + 1)
    out_n = n if d.flag() else d.u16() % (8 * SECTOR_SIZE + 1)
    encrypt = d.flag()
    data = (d.take(64) * (n // 64 + 1))[:n]
    arena = bytearray(GUARD + b"\x5a" * out_n + GUARD)
    out = memoryview(arena)[len(GUARD) : len(GUARD) + out_n]
    count = n // SECTOR_SIZE
    valid = n % SECTOR_SIZE == 0 and out_n == n and (not count or sector + count - 1 <= U64_MAX)
    try:
        (c.encrypt_into if encrypt else c.decrypt_into)(sector, data, out)
    except ValueError:
        assert not valid, f"refused a valid call: sector {sector}, {n} -> {out_n} bytes"
        assert arena == GUARD + b"\x5a" * out_n + GUARD, "a refused call wrote"
        return
    assert valid, f"accepted sector {sector}, {n} bytes into {out_n}"
    assert arena[: len(GUARD)] == GUARD and arena[-len(GUARD) :] == GUARD, "wrote outside"
    assert bytes(out) == _reference(sector, data, encrypt), "differs from OpenSSL's XTS"


def _read(d: Data, disk: EncryptedDisk, image: bytes) -> None:
    """A read as the device makes one (a checked sector range, whole sectors), split over
    1-3 guest buffers of any sizes; the end of the image is included."""
    count = 1 + d.u8() % 16
    sector = d.u16() % (CAPACITY - count + 1)
    total = count * SECTOR_SIZE
    cuts = sorted({d.u16() % total for _ in range(d.u8() % 3)} - {0})
    arena = bytearray(GUARD + b"\x5a" * total + GUARD)
    bounds = [0, *cuts, total]
    views = [memoryview(arena)[len(GUARD) + a : len(GUARD) + b]
             for a, b in itertools.pairwise(bounds)]
    disk.read_into(views, sector * SECTOR_SIZE, total, False)
    assert arena[: len(GUARD)] == GUARD and arena[-len(GUARD) :] == GUARD, "wrote outside"
    want = _reference(sector, image[sector * SECTOR_SIZE :][:total], encrypt=False)
    assert bytes(arena[len(GUARD) : -len(GUARD)]) == want, "read differs from OpenSSL's XTS"


def one_input(data: bytes) -> None:
    if not _state:
        setup()
    d = Data(data)
    mode = d.u8() % 3
    dev = _state["dev"]
    assert isinstance(dev, VirtioBlk)
    cipher = _state["cipher"]
    assert isinstance(cipher, SectorCipher)
    image = _state["image"]
    assert isinstance(image, bytes)
    if mode == 0:
        _calls(d, cipher)
        return
    if mode == 1:
        assert isinstance(dev.disk, EncryptedDisk)
        _read(d, dev.disk, image)
        return
    rig.drive(dev, d)
    fd = dev.disk.fd
    assert os.fstat(fd).st_size == DISK_BYTES, "the image grew"
    after = os.pread(fd, DISK_BYTES, 0)
    if after != image:  # what the guest wrote still decrypts; restore for replayability
        cipher.decrypt(0, after)
        os.pwrite(fd, image, 0)
