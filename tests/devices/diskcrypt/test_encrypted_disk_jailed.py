"""`isovisor run --disk PATH,keyfile=FILE|keyfd=N` in the jailed worker (the default): the
key reaches the worker in its launch message, the guest (guests/blk_driver.asm, -DSERIAL)
writes its pattern and reads it back, and the image never holds the pattern."""

from __future__ import annotations

import os
from pathlib import Path

from isovisor.devices.diskcrypt.xts import SectorCipher
from tests.devices.diskcrypt.test_encrypted_disk import PATTERN
from tests.devices.virtio.serial_guests import build_serial_guest as build
from tests.devices.virtio.test_jailed_guests import (  # noqa: F401 (fixture)
    _jail_possible,
    ended_cleanly,
    run_jailed,
)

SECTORS = 64


def test_an_encrypted_disk_in_a_jailed_worker_never_holds_plaintext(tmp_path: Path) -> None:
    key = os.urandom(64)
    image = tmp_path / "enc.img"
    image.write_bytes(SectorCipher(key).encrypt(0, bytes(SECTORS * 512)))
    keyfile = tmp_path / "disk.key"
    keyfile.write_bytes(key)
    keyfile.chmod(0o600)
    vals, r = run_jailed(build(tmp_path, "blk_driver"), "--disk", f"{image},keyfile={keyfile}")
    ended_cleanly(r, vals)
    assert vals[7:16] == [0, 1, 0, 1, 0, 1025, 0, 21, 0], [hex(v) for v in vals]
    data = image.read_bytes()
    for i in range(0, len(PATTERN) - 8, 4):
        assert PATTERN[i : i + 8] not in data
    assert SectorCipher(key).decrypt(1, data[512:1536]) == PATTERN
    assert key.hex() not in r.stderr and key.hex() not in r.stdout
