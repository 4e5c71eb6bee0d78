"""VM records: spec, desired and actual state, the runner handle; quota-checked create."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

from isovisor.host.db import Database
from isovisor.host.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from isovisor.host.models import Disk, Page, Vm, VmNic, VmState, check_name, now
from isovisor.host.network.store import MAX_NICS, NetworkStore
from isovisor.host.paging import paginate

MAX_VCPUS = 64
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 16, 64 << 10
MAX_CMDLINE = 2048  # the Linux boot protocol's COMMAND_LINE_SIZE
MAX_DISKS = 8


@dataclass(frozen=True)
class VmSpec:
    name: str
    kernel: str
    vcpus: int = 1
    memory_mib: int = 256
    initrd: str | None = None
    cmdline: str = ""
    disks: tuple[Disk, ...] = ()
    rng: bool = False
    nics: tuple[str, ...] = ()  # names of networks of the VM's tenant, one NIC each

    def check(self) -> VmSpec:
        check_name("VM", self.name)
        check_name("image", self.kernel)
        if self.initrd is not None:
            check_name("image", self.initrd)
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise InvalidRequest(f"vcpus must be between 1 and {MAX_VCPUS}")
        if not MIN_MEMORY_MIB <= self.memory_mib <= MAX_MEMORY_MIB:
            raise InvalidRequest(
                f"memoryMiB must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}")
        if len(self.disks) > MAX_DISKS:
            raise InvalidRequest(f"at most {MAX_DISKS} disks")
        for disk in self.disks:
            if (disk.image is None) == (disk.disk is None):
                raise InvalidRequest("a disk names exactly one of image or disk")
            if disk.image is not None:
                check_name("image", disk.image)
            else:
                check_name("disk", str(disk.disk))
        named = [d.disk for d in self.disks if d.disk is not None]
        if len(set(named)) != len(named):
            raise InvalidRequest("a disk can be attached only once")
        if len(self.nics) > MAX_NICS:
            raise InvalidRequest(f"at most {MAX_NICS} NICs")
        for network in self.nics:
            check_name("network", network)
        if len(self.cmdline) > MAX_CMDLINE or not self.cmdline.isprintable():
            raise InvalidRequest(f"cmdline must be printable and at most {MAX_CMDLINE} characters")
        return self


class VmStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, tenant: str, spec: VmSpec) -> Vm:
        """Insert the VM if the tenant's quota allows it. The usage check and the insert are
        one BEGIN IMMEDIATE transaction, so concurrent creates cannot both pass the check."""
        spec.check()
        stamp = now()
        with self.db.write() as conn:
            t = conn.execute("SELECT * FROM tenants WHERE name = ?", (tenant,)).fetchone()
            if t is None:
                raise NotFound(f"tenant {tenant!r} not found")
            for image in filter(None, (spec.kernel, spec.initrd,
                                       *(d.image for d in spec.disks))):
                if conn.execute("SELECT 1 FROM images WHERE tenant = ? AND name = ?",
                                (tenant, image)).fetchone() is None:
                    raise InvalidRequest(f"image {image!r} not found in tenant {tenant!r}")
            for disk in filter(None, (d.disk for d in spec.disks)):
                # Looked up in this tenant only: another tenant's disk is not found (#9).
                if conn.execute("SELECT 1 FROM disks WHERE tenant = ? AND name = ?",
                                (tenant, disk)).fetchone() is None:
                    raise InvalidRequest(f"disk {disk!r} not found in tenant {tenant!r}")
            used = conn.execute(
                "SELECT COALESCE(SUM(vcpus), 0), COALESCE(SUM(memory_mib), 0), COUNT(*) "
                "FROM vms WHERE tenant = ?", (tenant,)).fetchone()
            for label, have, add, cap in (
                ("VMs", used[2], 1, t["max_vms"]),
                ("vCPUs", used[0], spec.vcpus, t["max_vcpus"]),
                ("MiB of memory", used[1], spec.memory_mib, t["max_memory_mib"]),
            ):
                if have + add > cap:
                    raise QuotaExceeded(
                        f"tenant {tenant!r} quota exceeded: {have} of {cap} {label} in use, "
                        f"this VM needs {add}")
            try:
                conn.execute(
                    "INSERT INTO vms (tenant, name, id, vcpus, memory_mib, kernel, initrd, "
                    "cmdline, desired, state, created_at, updated_at, disks, rng) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (tenant, spec.name, uuid.uuid4().hex, spec.vcpus, spec.memory_mib,
                     spec.kernel, spec.initrd, spec.cmdline, "stopped", VmState.STOPPED,
                     stamp, stamp,
                     json.dumps([d.to_json() for d in spec.disks]), int(spec.rng)))
            except sqlite3.IntegrityError:
                raise Conflict(f"VM {spec.name!r} already exists") from None
            vm_id = conn.execute("SELECT id FROM vms WHERE tenant = ? AND name = ?",
                                 (tenant, spec.name)).fetchone()[0]
            NetworkStore.allocate_nics(conn, tenant, vm_id, spec.nics)
        return self.get(tenant, spec.name)

    def _load(self, row: sqlite3.Row) -> Vm:
        vm = Vm.from_row(row)
        nics = self.db.conn.execute(
            "SELECT nics.id, networks.name, nics.mac, nics.ip FROM nics JOIN networks "
            "ON networks.id = nics.network_id WHERE nics.vm_id = ? ORDER BY nics.slot",
            (vm.id,)).fetchall()
        return replace(vm, nics=tuple(VmNic(*n) for n in nics)) if nics else vm

    def get(self, tenant: str, name: str) -> Vm:
        row = self.db.conn.execute("SELECT * FROM vms WHERE tenant = ? AND name = ?",
                                   (tenant, name)).fetchone()
        if row is None:
            raise NotFound(f"VM {name!r} not found")
        return self._load(row)

    def by_id(self, vm_id: str) -> Vm | None:
        row = self.db.conn.execute("SELECT * FROM vms WHERE id = ?", (vm_id,)).fetchone()
        return None if row is None else self._load(row)

    def page(self, tenant: str, limit: int | None, token: str | None,
             keep: Callable[[Vm], bool]) -> Page[Vm]:
        return paginate(self.db.conn, "SELECT * FROM vms WHERE tenant = ?", (tenant,), "name",
                        self._load, limit, token, keep)

    def active(self) -> list[Vm]:
        rows = self.db.conn.execute("SELECT * FROM vms WHERE state != ?", (VmState.STOPPED,))
        return [self._load(r) for r in rows]

    def update(self, vm_id: str, **fields: object) -> Vm:
        fields["updated_at"] = now()
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.db.write() as conn:
            cur = conn.execute(f"UPDATE vms SET {cols} WHERE id = ?", (*fields.values(), vm_id))
            if cur.rowcount == 0:
                raise NotFound(f"VM {vm_id!r} not found")
        vm = self.by_id(vm_id)
        assert vm is not None
        return vm

    def delete(self, vm_id: str) -> None:
        with self.db.write() as conn:
            conn.execute("DELETE FROM vms WHERE id = ?", (vm_id,))
