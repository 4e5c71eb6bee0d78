"""The attack-surface inventory: everything a guest or a client can reach, derived from
the code (see docs/SECURITY.md and THREAT_MODEL.md). `generate()` builds it; the checked-in
copy is security/surface.json; `isovisor surface --check` and the CI tests compare them."""

from isovisor.security.surface.generate import (
    INVENTORY_PATH,
    check,
    generate,
    repo_root,
    write,
)
from isovisor.security.surface.model import SCHEMA_VERSION, Entry, Inventory, SurfaceError

__all__ = [
    "INVENTORY_PATH",
    "SCHEMA_VERSION",
    "Entry",
    "Inventory",
    "SurfaceError",
    "check",
    "generate",
    "repo_root",
    "write",
]
