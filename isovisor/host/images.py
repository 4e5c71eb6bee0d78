"""Images (kernels, initrds) per tenant: files under the state directory, one row each.

A VM names its kernel by image name; clients never name host paths."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path

from isovisor.host.db import Database
from isovisor.host.errors import Conflict, NotFound, PayloadTooLarge
from isovisor.host.models import Image, Page, check_name, now
from isovisor.host.paging import paginate

# The stock Debian vmlinux is about 60 MiB; an initramfs can be larger.
MAX_IMAGE_BYTES = 512 << 20


class ImageStore:
    def __init__(self, db: Database, root: Path) -> None:
        self.db = db
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, tenant: str, name: str) -> Path:
        return self.root / check_name("tenant", tenant) / check_name("image", name)

    def put(self, tenant: str, name: str, chunks: Iterable[bytes]) -> Image:
        target = self.path(tenant, name)
        target.parent.mkdir(exist_ok=True, mode=0o700)
        tmp = target.with_name(f".{name}.{os.getpid()}.{id(chunks)}.tmp")
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "xb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > MAX_IMAGE_BYTES:
                        raise PayloadTooLarge(f"images are limited to {MAX_IMAGE_BYTES >> 20} MiB")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            with self.db.write() as conn:
                if conn.execute("SELECT 1 FROM images WHERE tenant = ? AND name = ?",
                                (tenant, name)).fetchone():
                    raise Conflict(f"image {name!r} already exists")
                conn.execute("INSERT INTO images (tenant, name, size, sha256, created_at) "
                             "VALUES (?, ?, ?, ?, ?)", (tenant, name, size, digest.hexdigest(),
                                                        now()))
                os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return self.get(tenant, name)

    def get(self, tenant: str, name: str) -> Image:
        row = self.db.conn.execute("SELECT * FROM images WHERE tenant = ? AND name = ?",
                                   (tenant, name)).fetchone()
        if row is None:
            raise NotFound(f"image {name!r} not found")
        return Image.from_row(row)

    def page(self, tenant: str, limit: int | None, token: str | None,
             keep: Callable[[Image], bool]) -> Page[Image]:
        return paginate(self.db.conn, "SELECT * FROM images WHERE tenant = ?", (tenant,),
                        "name", Image.from_row, limit, token, keep)

    def delete(self, tenant: str, name: str) -> None:
        with self.db.write() as conn:
            if conn.execute("SELECT 1 FROM images WHERE tenant = ? AND name = ?",
                            (tenant, name)).fetchone() is None:
                raise NotFound(f"image {name!r} not found")
            for vm, kernel, initrd, disks in conn.execute(
                    "SELECT name, kernel, initrd, disks FROM vms WHERE tenant = ?", (tenant,)):
                if name in (kernel, initrd) or any(
                        d.get("image") == name for d in json.loads(disks)):
                    raise Conflict(f"image {name!r} is used by VM {vm!r}")
            try:
                conn.execute("DELETE FROM images WHERE tenant = ? AND name = ?", (tenant, name))
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"image {name!r} is in use") from exc
        self.path(tenant, name).unlink(missing_ok=True)

    def vm_disk(self, tenant: str, image: str, vm_id: str, index: int) -> Path:
        """The private writable copy of `image` for disk `index` of a VM, made once."""
        target = self.disk_dir(vm_id) / f"disk{index}.img"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(self.path(tenant, image), tmp)
            os.chmod(tmp, 0o600)
            os.replace(tmp, target)
        return target

    def disk_dir(self, vm_id: str) -> Path:
        return self.root.parent / "disks" / vm_id

    def delete_vm_disks(self, vm_id: str) -> None:
        shutil.rmtree(self.disk_dir(vm_id), ignore_errors=True)
