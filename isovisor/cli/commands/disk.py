"""`isovisor disk`: a tenant's persistent disks through the management API (like `az disk`):
create with a size, list, show, delete. Every disk is encrypted at rest (AES-XTS-256, a key
per disk wrapped by the tenant's key); deleting one shreds it. Attach one to a VM with
`isovisor vm create --disk disk=NAME`."""

from __future__ import annotations

import argparse

from isovisor.cli.config import field
from isovisor.cli.tenant_resources import TenantResource

DISK_COLUMNS = [("NAME", field("name")), ("SIZE", lambda d: f"{d['sizeMiB']}M"),
                ("ENCRYPTION", field("encryption")), ("CREATED", lambda d: d["createdAt"][:19])]


def _mib(text: str) -> int:
    units = {"M": 1, "G": 1 << 10, "T": 1 << 20}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units else "M"
    number = t[:-1] if t[-1:] in units else t
    if not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected a size like 512M or 4G")
    return int(number) * units[unit]


def _size_option(create: argparse.ArgumentParser) -> None:
    create.add_argument("--size", type=_mib, required=True,
                        help="size, e.g. 512M or 4G (whole MiB, at most 1T)")


DISKS = TenantResource(
    noun="disk", collection="disks", help="encrypted disks of a tenant (management API)",
    columns=DISK_COLUMNS,
    create_help="create a disk (encrypted at rest, its own key)",
    add_create_options=_size_option, create_body=lambda args: {"sizeMiB": args.size},
    delete_help="delete (shred) a disk: its key is destroyed first; no VM may name it",
    deleted=" (its key destroyed)",
)
register = DISKS.register
