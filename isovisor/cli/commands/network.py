"""`isovisor network`: a tenant's virtual networks through the management API (like
`az network vnet`): create with a CIDR, list, show, delete."""

from __future__ import annotations

import argparse
import uuid

from isovisor.cli.config import add_client_options, api, field, show, show_fields, tenant_of

NETWORK_COLUMNS = [("NAME", field("name")), ("CIDR", field("cidr")),
                   ("GATEWAY", field("gateway")), ("CREATED", lambda n: n["createdAt"][:19])]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("network", help="virtual networks of a tenant (management API)")
    cmds = p.add_subparsers(dest="network_command", metavar="COMMAND", required=True)
    every: list[argparse.ArgumentParser] = []

    def cmd(name: str, help_text: str, handler: object, *, named: bool = True
            ) -> argparse.ArgumentParser:
        c = cmds.add_parser(name, help=help_text)
        if named:
            c.add_argument("name", help="network name")
        c.add_argument("--tenant", "-t", help="tenant (default: `tenant` in the client config)")
        c.set_defaults(handler=handler)
        every.append(c)
        return c

    create = cmd("create", "create a network (its own L2 segment, DHCP for its VMs)",
                 cmd_create)
    create.add_argument("--cidr", required=True,
                        help="IPv4 network, /16 to /29 (e.g. 10.8.0.0/24); the first address "
                        "is the host's (DHCP server)")
    cmd("list", "networks of the tenant", cmd_list, named=False)
    cmd("show", "one network", cmd_show)
    cmd("delete", "delete a network (no VM may still have a NIC on it)", cmd_delete)
    for c in every:
        add_client_options(c)


def _base(args: argparse.Namespace) -> str:
    return f"/v1/tenants/{tenant_of(args)}/networks"


def cmd_create(args: argparse.Namespace) -> int:
    with api(args) as client:
        network = client.post(_base(args), json={"name": args.name, "cidr": args.cidr},
                              headers={"Idempotency-Key": uuid.uuid4().hex})
    show(args, network, NETWORK_COLUMNS)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with api(args) as client:
        show(args, client.list_all(_base(args)), NETWORK_COLUMNS)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with api(args) as client:
        show_fields(args, client.get(f"{_base(args)}/{args.name}"))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with api(args) as client:
        client.delete(f"{_base(args)}/{args.name}")
    print(f"network {args.name!r} deleted")
    return 0
