"""`isovisor disk`: a tenant's persistent disks through the management API (like `az disk`):
create with a size, list, show, delete. Every disk is encrypted at rest (AES-XTS-256, a key
per disk wrapped by the tenant's key); deleting one shreds it. Attach one to a VM with
`isovisor vm create --disk disk=NAME`."""

from __future__ import annotations

import argparse
import uuid

from isovisor.cli.config import add_client_options, api, field, show, show_fields, tenant_of

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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("disk", help="encrypted disks of a tenant (management API)")
    cmds = p.add_subparsers(dest="disk_command", metavar="COMMAND", required=True)
    every: list[argparse.ArgumentParser] = []

    def cmd(name: str, help_text: str, handler: object, *, named: bool = True
            ) -> argparse.ArgumentParser:
        c = cmds.add_parser(name, help=help_text)
        if named:
            c.add_argument("name", help="disk name")
        c.add_argument("--tenant", "-t", help="tenant (default: `tenant` in the client config)")
        c.set_defaults(handler=handler)
        every.append(c)
        return c

    create = cmd("create", "create a disk (encrypted at rest, its own key)", cmd_create)
    create.add_argument("--size", type=_mib, required=True,
                        help="size, e.g. 512M or 4G (whole MiB, at most 1T)")
    cmd("list", "disks of the tenant", cmd_list, named=False)
    cmd("show", "one disk", cmd_show)
    cmd("delete", "delete (shred) a disk: its key is destroyed first; no VM may name it",
        cmd_delete)
    for c in every:
        add_client_options(c)


def _base(args: argparse.Namespace) -> str:
    return f"/v1/tenants/{tenant_of(args)}/disks"


def cmd_create(args: argparse.Namespace) -> int:
    with api(args) as client:
        disk = client.post(_base(args), json={"name": args.name, "sizeMiB": args.size},
                           headers={"Idempotency-Key": uuid.uuid4().hex})
    show(args, disk, DISK_COLUMNS)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with api(args) as client:
        show(args, client.list_all(_base(args)), DISK_COLUMNS)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with api(args) as client:
        show_fields(args, client.get(f"{_base(args)}/{args.name}"))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with api(args) as client:
        client.delete(f"{_base(args)}/{args.name}")
    print(f"disk {args.name!r} deleted (its key destroyed)")
    return 0
