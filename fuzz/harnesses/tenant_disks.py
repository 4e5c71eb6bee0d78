"""Encrypted tenant disks below the API (issue #9): DiskStore and VmStore on a real SQLite
database and key hierarchy, fed sequences of disk creates and deletes (fuzzed names and
sizes), VM creates attaching fuzzed disk lists (own and the other tenant's names), VM
deletes; then fuzzed wrapped-key blobs to unwrap and fuzzed worker-config disk
descriptions (the `key` field that carries a disk key to the jailed worker).

Oracles: nothing but HostError escapes the stores, UnwrapError the unwrap, ProtocolError
the config parser; a refused operation changes no row; every disk row's key unwraps under
its tenant's current key and has distinct XTS halves; each disk row has its file and each
file its row; a VM names only disks of its own tenant; a shredded disk's old wrapped key
unwraps under no tenant key left."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from fuzz.data import Data

COVERS = ("api:POST /v1/tenants/{tenant}/disks",
          "api:DELETE /v1/tenants/{tenant}/disks/{disk}",
          "api:GET /v1/tenants/{tenant}/disks*",
          "host:state/volumes", "host:state/storage-keys")
CI_RUNS = 60
TENANTS = ("a", "b")
NAMES = ("data", "logs", "x", "", "A", "..", "a-b", "x" * 70, "../b", "~vm-0", "data ")
_state: dict[str, Any] = {}


def setup() -> None:
    _state["tmp"] = tempfile.TemporaryDirectory(prefix="isovisor-fuzz-disks-")


def _snapshot(db: Any) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    c = db.conn
    return ([tuple(r) for r in c.execute("SELECT * FROM disks ORDER BY id")],
            [tuple(r) for r in c.execute("SELECT id, disks FROM vms ORDER BY id")])


def _check(db: Any, disks: Any, root: Path) -> None:
    rows = db.conn.execute("SELECT tenant, id, wrapped_key FROM disks").fetchall()
    with db.write() as conn:
        for tenant, _disk_id, wrapped in rows:
            key = disks.keys.unwrap_disk_key(conn, tenant, bytes(wrapped))
            assert len(key) == 64 and key[:32] != key[32:]
    files = {p.stem for p in root.rglob("*.img")}
    assert files == {r[1] for r in rows}, (files, rows)
    for tenant, spec in db.conn.execute("SELECT tenant, disks FROM vms"):
        for d in json.loads(spec):
            if d.get("disk") is not None:
                assert db.conn.execute("SELECT 1 FROM disks WHERE tenant = ? AND name = ?",
                                       (tenant, d["disk"])).fetchone(), "another tenant's disk"


def one_input(data: bytes) -> None:
    from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

    from isovisor.host.db import Database
    from isovisor.host.disks import DiskStore
    from isovisor.host.errors import HostError
    from isovisor.host.images import ImageStore
    from isovisor.host.keys.hierarchy import KeyHierarchy, UnwrapError
    from isovisor.host.keys.master_key import FileMasterKey
    from isovisor.host.models import Disk
    from isovisor.host.tenants import TenantStore
    from isovisor.host.vms import VmSpec, VmStore
    from isovisor.worker.devices import disk_from_json
    from isovisor.worker.errors import ProtocolError

    if not _state:
        setup()
    d = Data(data)
    with tempfile.TemporaryDirectory(dir=_state["tmp"].name) as tmp:
        db = Database(Path(tmp) / "state.sqlite3")
        try:
            keys = KeyHierarchy(FileMasterKey(Path(tmp) / "master.key"))
            disks = DiskStore(db, Path(tmp) / "volumes", keys)
            tenants, images, vms = TenantStore(db), ImageStore(db, Path(tmp) / "img"), VmStore(db)
            for t in TENANTS:
                tenants.create(t)
                images.put(t, "k", [b"\x7fELF"])
            shredded: list[bytes] = []
            for step in range(d.u8() % 16 + 1):
                if d.exhausted:
                    break
                op, tenant = d.u8() % 4, TENANTS[d.u8() & 1]
                name = NAMES[d.u8() % len(NAMES)] if d.flag() else d.blob(20).decode(
                    "utf-8", "replace")
                before = _snapshot(db)
                try:
                    if op == 0:
                        disks.create(tenant, name, d.u8() % 4 - 1 if d.flag() else d.u16())
                    elif op == 1:
                        row = db.conn.execute("SELECT wrapped_key FROM disks WHERE tenant = ? "
                                              "AND name = ?", (tenant, name)).fetchone()
                        disks.delete(tenant, name)
                        if row is not None:
                            shredded.append(bytes(row[0]))
                    elif op == 2:
                        specs = tuple(Disk(disk=NAMES[d.u8() % 3]) if d.flag()
                                      else Disk(image="k", readonly=d.flag())
                                      for _ in range(d.u8() % 4))
                        vms.create(tenant, VmSpec(name=f"v{step}", kernel="k", disks=specs))
                    else:
                        row = db.conn.execute("SELECT id FROM vms WHERE tenant = ? LIMIT 1",
                                              (tenant,)).fetchone()
                        if row is not None:
                            vms.delete(row[0])
                except HostError:
                    assert _snapshot(db) == before, "a refused operation changed the state"
                _check(db, disks, Path(tmp) / "volumes")
            master = FileMasterKey(Path(tmp) / "master.key").load()  # made on first use
            live = [aes_key_unwrap(master, bytes(w))
                    for (w,) in db.conn.execute("SELECT wrapped FROM tenant_keys")]
            for old in shredded:
                for kek in live:
                    try:
                        aes_key_unwrap(kek, old)
                    except InvalidUnwrap:
                        continue
                    raise AssertionError("a shredded disk key still unwraps")
            blob = d.blob(80)
            try:
                with db.write() as conn:
                    keys.unwrap_disk_key(conn, "a", blob)
            except UnwrapError:
                pass
        finally:
            db.close()
    doc = {"path": "/x", "readonly": False, "direct": False, "serial": None, "bw": None,
           "ops": None, "key": d.blob(140).decode("latin-1") if d.flag() else None}
    try:
        spec = disk_from_json(doc)
        assert spec.key is None or len(spec.key) == 64
    except ProtocolError:
        pass
