"""The inventory's data model: entries with stable ids, serialised as deterministic JSON.

An entry is one thing a guest or a client can reach (a port range, an MMIO window, a
virtio device type, a KVM exit the vCPU loop handles, an API route, a file the daemon
creates...). Its `id` is the key THREAT_MODEL.md and the fuzz harnesses refer to, so ids
name what the thing *is* (`pio:com1`, `api:POST /v1/tenants`), never where it happens to
land (addresses and modes are details: they change the JSON, not the id).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Bump when the JSON's shape (not its content) changes.
SCHEMA_VERSION = 1
GENERATOR = "isovisor.security.surface"

# Trust boundaries (THREAT_MODEL.md, "Trust boundaries").
GUEST_VMM = "guest/vmm"  # guest code -> device models, vCPU exits, boot structures
VMM_HOST = "vmm/host"  # a (compromised) VMM or other local process -> the host daemon
TENANT_TENANT = "tenant/tenant"  # one tenant's VM or data -> another's
CLIENT_API = "client/api"  # an API client -> isovisord
HOST_TPM = "host/tpm"  # the host -> its TPM (measured launch)
BOUNDARIES = (GUEST_VMM, VMM_HOST, TENANT_TENANT, CLIENT_API, HOST_TPM)

KINDS = (
    "pio", "mmio", "virtio", "virtqueue", "exit", "assist", "boot", "acpi",
    "api", "host", "worker",
)


class SurfaceError(Exception):
    """The inventory cannot be generated (one sentence saying what to change)."""


@dataclass(frozen=True)
class Entry:
    id: str  # "<kind>:<name>", stable
    boundary: str  # one of BOUNDARIES
    source: str  # the code that implements it: "module.Class" or "module.function"
    details: Mapping[str, Any]

    @property
    def kind(self) -> str:
        return self.id.partition(":")[0]

    def __post_init__(self) -> None:
        if self.kind not in KINDS or not self.id.partition(":")[2]:
            raise SurfaceError(f"inventory id {self.id!r} is not <kind>:<name> with a known kind")
        if self.boundary not in BOUNDARIES:
            raise SurfaceError(f"inventory entry {self.id}: unknown boundary {self.boundary!r}")

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "boundary": self.boundary,
                "source": self.source, **dict(self.details)}


def hexa(value: int) -> str:
    """Addresses as hex strings: readable in a diff, exact in JSON."""
    return f"{value:#x}"


@dataclass(frozen=True)
class Inventory:
    entries: tuple[Entry, ...]

    @classmethod
    def of(cls, entries: Iterable[Entry]) -> Inventory:
        by_id: dict[str, Entry] = {}
        for e in entries:
            if e.id in by_id:
                raise SurfaceError(f"two inventory entries have the id {e.id!r}")
            by_id[e.id] = e
        return cls(tuple(by_id[k] for k in sorted(by_id)))

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(e.id for e in self.entries)

    def as_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA_VERSION, "generator": GENERATOR,
                "entries": [e.as_json() for e in self.entries]}

    def dumps(self) -> str:
        return json.dumps(self.as_json(), indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def load_ids(text: str) -> tuple[str, ...]:
    """The entry ids of a serialised inventory (SurfaceError if it is not one)."""
    try:
        doc = json.loads(text)
        if doc["schema"] != SCHEMA_VERSION:
            raise SurfaceError(
                f"inventory schema {doc['schema']} is not {SCHEMA_VERSION}: regenerate it")
        return tuple(str(e["id"]) for e in doc["entries"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SurfaceError(f"not an inventory: {exc}") from None


def diff(expected: str, actual: str, *, expected_name: str, actual_name: str) -> str:
    """A unified diff of two serialised inventories ("" when equal)."""
    return "".join(difflib.unified_diff(
        expected.splitlines(keepends=True), actual.splitlines(keepends=True),
        fromfile=expected_name, tofile=actual_name, n=2))


def details(**fields: Any) -> dict[str, Any]:
    """Entry details without None values (absent, not null, keeps diffs small)."""
    return {k: v for k, v in fields.items() if v is not None}
