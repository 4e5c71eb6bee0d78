"""Encrypted disks in the daemon's state (issue #9): the key hierarchy (master -> tenant ->
disk, RFC 3394 key wrap), the root-only master key file, and crypto-shredding: after a
disk's deletion, the ciphertext and the old wrapped key (copied beforehand, as a backup
or an attacker would) decrypt under nothing left on the host; after a tenant's deletion,
its key row is gone; no key or plaintext is in the database files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from isovisor.devices.diskcrypt.xts import SectorCipher
from isovisor.host.errors import Conflict, InvalidRequest, NotFound
from isovisor.host.keys.master_key import FileMasterKey, MasterKeyError
from isovisor.host.models import Quota
from isovisor.host.service import DB_FILE, MASTER_KEY_FILE, HostService

SECRET = b"tenant a's secret sector content" * 16  # 512 bytes


@pytest.fixture
def svc(tmp_path: Path) -> HostService:
    s = HostService(tmp_path / "state")
    for t in ("a", "b"):
        s.tenants.create(t, "", Quota(4, 1024, 4))
    yield s
    s.close()


def _everything_on_the_host(state: Path) -> list[bytes]:
    """Every key-sized candidate left on the host: the master key, every tenant key that
    the master key unwraps, every byte string stored in the database files."""
    master = (state / MASTER_KEY_FILE).read_bytes()
    import sqlite3
    conn = sqlite3.connect(state / DB_FILE)
    tenant_keys = [aes_key_unwrap(master, bytes(w))
                   for (w,) in conn.execute("SELECT wrapped FROM tenant_keys")]
    conn.close()
    return [master, *tenant_keys]


def test_a_deleted_disk_is_undecryptable_with_what_remains(svc: HostService) -> None:
    svc.disks.create("a", "keep", 1)  # another disk of the tenant survives the shred
    d = svc.disks.create("a", "data", 1)
    path, key = svc.disks.open_for_vm("a", "data")
    path.write_bytes(SectorCipher(key).encrypt(0, SECRET) + path.read_bytes()[512:])
    ciphertext = path.read_bytes()
    old_wrapped = bytes(svc.db.conn.execute("SELECT wrapped_key FROM disks WHERE id = ?",
                                            (d.id,)).fetchone()[0])
    del key
    svc.disks.delete("a", "data")
    assert not path.exists()
    with pytest.raises(NotFound):
        svc.disks.open_for_vm("a", "data")
    state = svc.state_dir
    candidates = _everything_on_the_host(state)
    for kek in candidates:  # the old wrapped disk key unwraps under no key on the host
        with pytest.raises(InvalidUnwrap):
            aes_key_unwrap(kek, old_wrapped)
    db_bytes = b"".join(p.read_bytes() for p in state.glob(DB_FILE + "*"))
    assert old_wrapped not in db_bytes  # secure_delete + checkpoint: not even in free pages
    # the surviving disk still opens (its key was rewrapped under the new tenant key)
    _, keep_key = svc.disks.open_for_vm("a", "keep")
    assert len(keep_key) == 64
    assert SECRET[:32] not in ciphertext


def test_a_deleted_tenant_loses_its_key(svc: HostService) -> None:
    svc.disks.create("b", "x", 1)
    with pytest.raises(Conflict, match="still has disks"):
        svc.delete_tenant("b")
    wrapped = bytes(svc.db.conn.execute(
        "SELECT wrapped FROM tenant_keys WHERE tenant = 'b'").fetchone()[0])
    svc.disks.delete("b", "x")
    svc.delete_tenant("b")
    assert svc.db.conn.execute("SELECT COUNT(*) FROM tenant_keys WHERE tenant = 'b'"
                               ).fetchone()[0] == 0
    db_bytes = b"".join(p.read_bytes() for p in svc.state_dir.glob(DB_FILE + "*"))
    assert wrapped not in db_bytes


def test_keys_are_stored_wrapped_only(svc: HostService) -> None:
    svc.disks.create("a", "data", 1)
    _, key = svc.disks.open_for_vm("a", "data")
    master = (svc.state_dir / MASTER_KEY_FILE).read_bytes()
    everything = b"".join(p.read_bytes() for p in svc.state_dir.rglob("*") if p.is_file()
                          and p.name != "master.key")
    assert key not in everything and key[:32] not in everything and key[32:] not in everything
    assert master not in everything
    assert (svc.state_dir / MASTER_KEY_FILE).stat().st_mode & 0o777 == 0o600


def test_one_tenants_disk_key_does_not_unwrap_under_another_tenants_key(
        svc: HostService) -> None:
    svc.disks.create("a", "data", 1)
    svc.disks.create("b", "data", 1)
    wrapped_a = bytes(svc.db.conn.execute(
        "SELECT wrapped_key FROM disks WHERE tenant = 'a'").fetchone()[0])
    svc.db.conn.execute("UPDATE disks SET wrapped_key = ? WHERE tenant = 'b'", (wrapped_a,))
    from isovisor.host.keys.hierarchy import UnwrapError
    with pytest.raises(UnwrapError, match="does not unwrap"):
        svc.disks.open_for_vm("b", "data")


@pytest.mark.parametrize("size", [0, -1, (1 << 20) + 1])
def test_bad_sizes_and_names_are_refused(svc: HostService, size: int) -> None:
    with pytest.raises(InvalidRequest, match="sizeMiB"):
        svc.disks.create("a", "d", size)
    with pytest.raises(InvalidRequest, match="disk name"):
        svc.disks.create("a", "../x", 1)
    with pytest.raises(NotFound):
        svc.disks.create("nope", "d", 1)


def test_the_master_key_file_must_be_root_only(tmp_path: Path) -> None:
    src = FileMasterKey(tmp_path / "m.key")
    key = src.load()
    assert src.load() == key and len(key) == 32
    os.chmod(tmp_path / "m.key", 0o644)
    with pytest.raises(MasterKeyError, match="0644"):
        src.load()
    os.chmod(tmp_path / "m.key", 0o600)
    (tmp_path / "m.key").write_bytes(b"short")
    with pytest.raises(MasterKeyError, match="5 bytes"):
        src.load()
    (tmp_path / "link").symlink_to(tmp_path / "m.key")
    with pytest.raises(MasterKeyError, match="symlink"):
        FileMasterKey(tmp_path / "link").load()
