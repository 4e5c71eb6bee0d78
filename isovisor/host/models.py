"""What the daemon stores: tenants, VMs, images, role assignments (plain records)."""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
import sqlite3
from dataclasses import dataclass
from typing import Generic, TypeVar

from isovisor.host.errors import InvalidRequest

# Resource names appear in scopes and paths: the same rule as rbac.scopes.NAME_RE.
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidRequest(
            f"{kind} name {name!r} is invalid: lowercase letters, digits and '-', "
            "1 to 63 characters, starting with a letter or digit")
    return name


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


class VmState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"


ACTIVE_STATES = frozenset({VmState.STARTING, VmState.RUNNING, VmState.PAUSED, VmState.STOPPING})


@dataclass(frozen=True)
class Quota:
    max_vcpus: int
    max_memory_mib: int
    max_vms: int


@dataclass(frozen=True)
class Tenant:
    name: str
    description: str
    quota: Quota
    created_at: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Tenant:
        return cls(row["name"], row["description"],
                   Quota(row["max_vcpus"], row["max_memory_mib"], row["max_vms"]),
                   row["created_at"])


@dataclass(frozen=True)
class Disk:
    """A VM's virtio-blk disk: one of the tenant's disks by name (`disk`: encrypted at
    rest, isovisor.host.disks), or a tenant image (`image`): read-only shares the image;
    writable gets a private encrypted copy per VM, made at first start and shredded with
    the VM."""

    image: str | None = None
    readonly: bool = False
    disk: str | None = None

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {"readonly": self.readonly}
        if self.image is not None:
            doc["image"] = self.image
        if self.disk is not None:
            doc["disk"] = self.disk
        return doc


@dataclass(frozen=True)
class VmNic:
    """A VM's network interface on a tenant network (isovisor.host.network): fixed MAC
    and IP, assigned when the VM is created."""

    id: str
    network: str
    mac: str
    ip: str


@dataclass(frozen=True)
class Vm:
    tenant: str
    name: str
    id: str
    vcpus: int
    memory_mib: int
    kernel: str
    initrd: str | None
    cmdline: str
    desired: str
    state: VmState
    handle: str | None
    last_exit_status: int | None
    last_stop_reason: str | None
    created_at: str
    updated_at: str
    started_at: str | None
    disks: tuple[Disk, ...] = ()
    rng: bool = False
    nics: tuple[VmNic, ...] = ()  # filled by VmStore from the nics table

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Vm:
        d = dict(row)
        d["state"] = VmState(d["state"])
        d["disks"] = tuple(Disk(x.get("image"), bool(x["readonly"]), x.get("disk"))
                           for x in json.loads(d["disks"]))
        d["rng"] = bool(d["rng"])
        return cls(**d)


@dataclass(frozen=True)
class Image:
    tenant: str
    name: str
    size: int
    sha256: str
    created_at: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Image:
        return cls(**dict(row))


@dataclass(frozen=True)
class RoleAssignment:
    id: str
    principal: str
    role: str
    role_scope: str | None  # None: a built-in role
    scope: str
    tenant: str | None
    created_at: str
    created_by: str

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> RoleAssignment:
        return cls(**dict(row))


T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_token: str | None
