"""`isovisor network`: a tenant's virtual networks through the management API (like
`az network vnet`): create with a CIDR, list, show, delete."""

from __future__ import annotations

import argparse

from isovisor.cli.config import field
from isovisor.cli.tenant_resources import TenantResource

NETWORK_COLUMNS = [("NAME", field("name")), ("CIDR", field("cidr")),
                   ("GATEWAY", field("gateway")), ("CREATED", lambda n: n["createdAt"][:19])]


def _cidr_option(create: argparse.ArgumentParser) -> None:
    create.add_argument("--cidr", required=True,
                        help="IPv4 network, /16 to /29 (e.g. 10.8.0.0/24); the first address "
                        "is the host's (DHCP server)")


NETWORKS = TenantResource(
    noun="network", collection="networks",
    help="virtual networks of a tenant (management API)", columns=NETWORK_COLUMNS,
    create_help="create a network (its own L2 segment, DHCP for its VMs)",
    add_create_options=_cidr_option, create_body=lambda args: {"cidr": args.cidr},
    delete_help="delete a network (no VM may still have a NIC on it)",
)
register = NETWORKS.register
