"""Disks: a tenant's persistent block devices, encrypted at rest (issue #9).

A disk is a raw image under <state>/volumes/<tenant>/<id>.img (0600) holding AES-XTS-256
ciphertext only: the VMM's virtio-blk backend decrypts into guest memory and encrypts
from it (isovisor.devices.diskcrypt). Its 64-byte key is made here, stored only wrapped by
the tenant's key (isovisor.host.keys), unwrapped when a VM using the disk starts and handed
to `isovisor run` through a pipe. A VM attaches disks of its own tenant only (VmStore looks
them up by (tenant, name)).

Deleting a disk shreds it: its row (and wrapped key) is deleted and the tenant key rotated
in one transaction, the database checkpointed, and only then the file removed. A new disk
is a sparse file: until the guest writes a sector, reading it yields noise (the decryption
of zeros), as with a fresh dm-crypt volume.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from isovisor.host.db import Database
from isovisor.host.errors import Conflict, InvalidRequest, NotFound
from isovisor.host.keys.hierarchy import KeyHierarchy, new_disk_key
from isovisor.host.models import Page, check_name, now
from isovisor.host.paging import paginate

MIN_DISK_MIB = 1
MAX_DISK_MIB = 1 << 20  # 1 TiB


@dataclass(frozen=True)
class DiskRecord:
    tenant: str
    name: str
    id: str
    size: int  # bytes
    created_at: str

    @classmethod
    def from_row(cls, row: object) -> DiskRecord:
        r = dict(row)  # type: ignore[call-overload]
        return cls(r["tenant"], r["name"], r["id"], r["size"], r["created_at"])


class DiskStore:
    def __init__(self, db: Database, root: Path, keys: KeyHierarchy) -> None:
        self.db = db
        self.root = root
        self.keys = keys
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def open(self) -> None:
        """Load (or create) the master key now (HostService.open, once the daemon chose its
        source): an unusable key stops the daemon at start, naming the file."""
        self.keys.ensure()

    def path(self, tenant: str, disk_id: str) -> Path:
        return self.root / check_name("tenant", tenant) / f"{disk_id}.img"

    def create(self, tenant: str, name: str, size_mib: int) -> DiskRecord:
        check_name("disk", name)
        if not MIN_DISK_MIB <= size_mib <= MAX_DISK_MIB:
            raise InvalidRequest(f"sizeMiB must be between {MIN_DISK_MIB} and {MAX_DISK_MIB}")
        disk_id = uuid.uuid4().hex
        target = self.path(tenant, disk_id)
        with self.db.write() as conn:
            if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (tenant,)).fetchone() is None:
                raise NotFound(f"tenant {tenant!r} not found")
            if conn.execute("SELECT 1 FROM disks WHERE tenant = ? AND name = ?",
                            (tenant, name)).fetchone():
                raise Conflict(f"disk {name!r} already exists")
            wrapped = self.keys.wrap_disk_key(conn, tenant, new_disk_key())
            target.parent.mkdir(exist_ok=True, mode=0o700)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size_mib << 20)
            finally:
                os.close(fd)
            try:
                conn.execute("INSERT INTO disks (tenant, name, id, size, wrapped_key, "
                             "created_at) VALUES (?, ?, ?, ?, ?, ?)",
                             (tenant, name, disk_id, size_mib << 20, wrapped, now()))
            except BaseException:
                target.unlink(missing_ok=True)
                raise
        return self.get(tenant, name)

    def get(self, tenant: str, name: str) -> DiskRecord:
        row = self.db.conn.execute("SELECT * FROM disks WHERE tenant = ? AND name = ? AND "
                                   "vm_id IS NULL", (tenant, name)).fetchone()
        if row is None:
            raise NotFound(f"disk {name!r} not found")
        return DiskRecord.from_row(row)

    def page(self, tenant: str, limit: int | None, token: str | None,
             keep: Callable[[DiskRecord], bool]) -> Page[DiskRecord]:
        return paginate(self.db.conn, "SELECT tenant, name, id, size, created_at FROM disks "
                        "WHERE tenant = ? AND vm_id IS NULL", (tenant,), "name",
                        DiskRecord.from_row, limit, token, keep)

    def count(self, tenant: str) -> int:
        return int(self.db.conn.execute("SELECT COUNT(*) FROM disks WHERE tenant = ?",
                                        (tenant,)).fetchone()[0])

    def open_for_vm(self, tenant: str, name: str) -> tuple[Path, bytes]:
        """The image path and the unwrapped key of a disk of `tenant` (a VM is starting)."""
        with self.db.write() as conn:
            row = conn.execute("SELECT id, wrapped_key FROM disks WHERE tenant = ? AND "
                               "name = ? AND vm_id IS NULL", (tenant, name)).fetchone()
            if row is None:
                raise NotFound(f"disk {name!r} not found in tenant {tenant!r}")
            key = self.keys.unwrap_disk_key(conn, tenant, bytes(row["wrapped_key"]))
        return self.path(tenant, row["id"]), key

    def delete(self, tenant: str, name: str) -> None:
        """Shred: row and wrapped key gone and the tenant key rotated (one transaction),
        the database checkpointed, then the file removed."""
        with self.db.write() as conn:
            row = conn.execute("SELECT id FROM disks WHERE tenant = ? AND name = ? AND "
                               "vm_id IS NULL", (tenant, name)).fetchone()
            if row is None:
                raise NotFound(f"disk {name!r} not found")
            for vm, disks in conn.execute("SELECT name, disks FROM vms WHERE tenant = ?",
                                          (tenant,)).fetchall():
                if any(d.get("disk") == name for d in json.loads(disks)):
                    raise Conflict(f"disk {name!r} is attached to VM {vm!r}")
            conn.execute("DELETE FROM disks WHERE id = ?", (row["id"],))
            self.keys.rotate_tenant_key(conn, tenant)
        self.checkpoint()
        self.path(tenant, row["id"]).unlink(missing_ok=True)

    # --- a VM's private encrypted copy of a writable image -----------------------------

    def vm_copy(self, tenant: str, vm_id: str, index: int, image: Path) -> tuple[Path, bytes]:
        """The encrypted private copy of `image` for disk `index` of a VM, made once (the
        image's bytes encrypted sector by sector, the tail padded to a whole sector), and
        its key."""
        name = f"~{vm_id}-{index}"  # not a valid API name: no clash with tenant disks
        with self.db.write() as conn:
            row = conn.execute("SELECT id, wrapped_key FROM disks WHERE tenant = ? AND "
                               "name = ?", (tenant, name)).fetchone()
            if row is not None:
                return (self.path(tenant, row["id"]),
                        self.keys.unwrap_disk_key(conn, tenant, bytes(row["wrapped_key"])))
            key = new_disk_key()
            disk_id = uuid.uuid4().hex
            target = self.path(tenant, disk_id)
            target.parent.mkdir(exist_ok=True, mode=0o700)
            size = _encrypted_copy(image, target, key)
            try:
                conn.execute("INSERT INTO disks (tenant, name, id, size, wrapped_key, "
                             "created_at, vm_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
                             (tenant, name, disk_id, size,
                              self.keys.wrap_disk_key(conn, tenant, key), now(), vm_id))
            except BaseException:
                target.unlink(missing_ok=True)
                raise
        return target, key

    def delete_vm_copies(self, tenant: str, vm_id: str) -> None:
        """Shred the VM's private copies (the VM is being deleted)."""
        with self.db.write() as conn:
            rows = conn.execute("SELECT id FROM disks WHERE tenant = ? AND vm_id = ?",
                                (tenant, vm_id)).fetchall()
            if not rows:
                return
            conn.execute("DELETE FROM disks WHERE tenant = ? AND vm_id = ?", (tenant, vm_id))
            self.keys.rotate_tenant_key(conn, tenant)
        self.checkpoint()
        for row in rows:
            self.path(tenant, row["id"]).unlink(missing_ok=True)

    def checkpoint(self) -> None:
        """Copy the WAL's (overwritten) pages into the database and empty the WAL."""
        with contextlib.suppress(Exception):
            self.db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def _encrypted_copy(image: Path, target: Path, key: bytes) -> int:
    """Write `image` encrypted to `target` (0600, created exclusively); its size."""
    from isovisor.devices.diskcrypt.xts import SECTOR_SIZE, SectorCipher

    cipher = SectorCipher(key)
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with image.open("rb") as src:
            while chunk := src.read(1 << 20):
                if len(chunk) % SECTOR_SIZE:
                    chunk += bytes(SECTOR_SIZE - len(chunk) % SECTOR_SIZE)
                os.write(fd, cipher.encrypt(size // SECTOR_SIZE, chunk))
                size += len(chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        target.unlink(missing_ok=True)
        raise
    os.close(fd)
    return size
