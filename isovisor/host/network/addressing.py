"""Network addressing: which CIDRs a tenant network may use, how its addresses are laid
out, and the host-side names of its objects.

A network `10.8.0.0/24` has its gateway (the bridge's address, the DHCP server) at the
first host address, 10.8.0.1; NICs get 10.8.0.2 upwards, in allocation order. Host object
names derive from the 8-hex-digit ids the store gives networks and NICs: bridge
`isvb-ID`, TAP `isvt-ID` (Linux interface names are at most 15 bytes), nft tables
`isovisor-net-ID` and `isovisor-nic-ID`, and the network's own network namespace
`PREFIX-ID` (PREFIX: the daemon's `network_namespace` setting), which holds all of them.

Each network being alone in its namespace, two tenants may use the same CIDR; within one
tenant networks may not overlap (see store.py)."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from isovisor.host.errors import InvalidRequest

MIN_PREFIX, MAX_PREFIX = 16, 29  # /16: 65534 hosts; /29: the gateway and 5 NICs
BRIDGE_PREFIX, TAP_PREFIX = "isvb-", "isvt-"
NET_TABLE_PREFIX, NIC_TABLE_PREFIX = "isovisor-net-", "isovisor-nic-"
MAX_NETNS_PREFIX = 55  # + "-" + 8 hex digits: the 64 characters a namespace name may have
_NETNS_PREFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,54}$")
_ID = re.compile(r"^[0-9a-f]{8}$")
# Blocks a tenant network may not take: they mean something to the host or to IP itself.
_RESERVED = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4"))


def new_id() -> str:
    return os.urandom(4).hex()


def check_id(value: str) -> str:
    if not _ID.match(value):
        raise ValueError(f"{value!r} is not an 8-hex-digit network or NIC id")
    return value


def bridge_name(network_id: str) -> str:
    return BRIDGE_PREFIX + check_id(network_id)


def tap_name(nic_id: str) -> str:
    return TAP_PREFIX + check_id(nic_id)


def net_table(network_id: str) -> str:
    return NET_TABLE_PREFIX + check_id(network_id)


def nic_table(nic_id: str) -> str:
    return NIC_TABLE_PREFIX + check_id(nic_id)


def check_netns_prefix(prefix: str) -> str:
    if not _NETNS_PREFIX.match(prefix):
        raise ValueError(f"network namespace prefix {prefix!r} is invalid (letters, digits, "
                         f"'.', '_' and '-', at most {MAX_NETNS_PREFIX})")
    return prefix


def netns_name(prefix: str, network_id: str) -> str:
    """The network namespace of network `network_id`: `PREFIX-ID`."""
    return f"{check_netns_prefix(prefix)}-{check_id(network_id)}"


def parse_cidr(text: str) -> ipaddress.IPv4Network:
    """A tenant network's CIDR: IPv4, /16 to /29, host bits zero, not a reserved block."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise InvalidRequest(f"CIDR {text!r} is not a network address with a prefix length "
                             f"(like 10.8.0.0/24): {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise InvalidRequest(f"CIDR {text!r}: only IPv4 networks are supported")
    if not MIN_PREFIX <= net.prefixlen <= MAX_PREFIX:
        raise InvalidRequest(f"CIDR {text!r}: the prefix length must be between /{MIN_PREFIX} "
                             f"and /{MAX_PREFIX}")
    for block in _RESERVED:
        if net.overlaps(block):
            raise InvalidRequest(f"CIDR {text!r} overlaps the reserved block {block}")
    return net


def gateway(net: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The host's address on the network: the DHCP server, never routed anywhere."""
    return net.network_address + 1


def next_free_ip(net: ipaddress.IPv4Network, used: Iterable[str]) -> ipaddress.IPv4Address:
    """The lowest NIC address of `net` not in `used`; InvalidRequest when full."""
    taken = set(used)
    first, last = int(net.network_address) + 2, int(net.broadcast_address) - 1
    for value in range(first, last + 1):
        addr = ipaddress.IPv4Address(value)
        if str(addr) not in taken:
            return addr
    raise InvalidRequest(f"network {net} has no free address left")


def new_mac() -> str:
    """A random unicast, locally administered MAC (02-prefixed octet pattern xxxxxx10)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return raw.hex(":")


@dataclass(frozen=True)
class NetworkPlan:
    """What the host builds for one network."""

    id: str
    cidr: ipaddress.IPv4Network

    @property
    def bridge(self) -> str:
        return bridge_name(self.id)

    @property
    def table(self) -> str:
        return net_table(self.id)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return gateway(self.cidr)


@dataclass(frozen=True)
class NicPlan:
    """What the host builds for one NIC: a TAP on its network's bridge, its rules."""

    id: str
    network: NetworkPlan
    mac: str
    ip: ipaddress.IPv4Address

    @property
    def tap(self) -> str:
        return tap_name(self.id)

    @property
    def table(self) -> str:
        return nic_table(self.id)
