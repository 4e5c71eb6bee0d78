"""The master key sealed to a real TPM (a swtpm the test starts): created once, unsealed
again, never in a file; another TPM cannot unseal it; a tampered or planted blob is
refused naming the file; the key hierarchy and disks work on top of it."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.host.keys.master_key import MasterKeyError
from isovisor.host.keys.tpm_master_key import TpmSealedMasterKey
from isovisor.security.tpm import Swtpm, TpmAddress

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None,
                                reason="LOUD SKIP: swtpm missing (make setup installs it)")


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    with Swtpm(tmp_path / "tpm") as sw:
        yield sw


def test_the_master_key_is_sealed_and_unsealed_by_the_tpm(tmp_path: Path,
                                                           swtpm: Swtpm) -> None:
    blob = tmp_path / "keys" / "master.sealed"
    source = TpmSealedMasterKey(TpmAddress.swtpm(swtpm.socket_path), blob)
    key = source.load()
    assert len(key) == 32
    assert blob.stat().st_mode & 0o777 == 0o600 and key not in blob.read_bytes()
    assert TpmSealedMasterKey(TpmAddress.swtpm(swtpm.socket_path), blob).load() == key
    with Swtpm(tmp_path / "other-tpm") as other, pytest.raises(  # useless on another TPM
            MasterKeyError, match="does not unseal on this TPM"):
        TpmSealedMasterKey(TpmAddress.swtpm(other.socket_path), blob).load()
    data = bytearray(blob.read_bytes())
    data[len(data) // 3] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(MasterKeyError, match=re.escape(str(blob))):
        source.load()
    blob.write_bytes(os.urandom(40))
    with pytest.raises(MasterKeyError,
                       match=r"not a sealed TPM object|does not unseal|trailing"):
        source.load()
    os.chmod(blob, 0o644)
    with pytest.raises(MasterKeyError, match="0600"):
        source.load()


def test_disks_work_on_a_tpm_sealed_master_key(tmp_path: Path, swtpm: Swtpm) -> None:
    from isovisor.host.db import Database
    from isovisor.host.disks import DiskStore
    from isovisor.host.keys.hierarchy import KeyHierarchy
    from isovisor.host.tenants import TenantStore

    address = TpmAddress.swtpm(swtpm.socket_path)
    db = Database(tmp_path / "state.sqlite3")
    try:
        TenantStore(db).create("a")
        keys = KeyHierarchy(TpmSealedMasterKey(address, tmp_path / "master.sealed"))
        disks = DiskStore(db, tmp_path / "volumes", keys)
        disks.create("a", "data", 1)
        _, key = disks.open_for_vm("a", "data")
        again = DiskStore(db, tmp_path / "volumes",
                          KeyHierarchy(TpmSealedMasterKey(address, tmp_path / "master.sealed")))
        assert again.open_for_vm("a", "data")[1] == key  # after a "restart"
    finally:
        db.close()
