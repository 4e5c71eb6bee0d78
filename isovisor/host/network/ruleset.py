"""The nftables rules of tenant networks, as `nft -f` text (no I/O here).

Per NIC, a `netdev` table whose ingress chain is bound to the NIC's TAP: it sees every
frame the guest sends before the bridge does (before MAC learning), and lets through only

  - ARP (Ethernet/IPv4) whose sender MAC is the NIC's MAC and sender IP its IP, or
    0.0.0.0 (an RFC 5227 probe);
  - IPv4 from the NIC's IP;
  - a DHCP client's UDP 68 -> 67 broadcast from 0.0.0.0 (it has no address yet);

always with the NIC's MAC as the Ethernet source. Everything else (other source
addresses, IPv6, VLAN tags, other ethertypes) is dropped by the chain's policy.

Per network, a `netdev` table whose ingress chain is bound to the network's bridge
device: it sees exactly what the bridge passes up to the host itself (frames for the
bridge's MAC, and the host's copy of broadcasts). Only ARP asking for the gateway address
and DHCP requests (UDP 68 -> 67, to the gateway or broadcast) pass; nothing else reaches
a host socket or the network namespace's routing (which holds no other network anyway). (A
`bridge`-family input chain would need `meta ibrname`, which this kernel lacks:
CONFIG_NFT_BRIDGE_META is not set.)

Frames never cross from one network to another: each network is a bridge of its own in a
network namespace of its own (plumbing.py), and a TAP is on exactly one, so broadcast and
multicast stay inside it. Each namespace has the tables of its own network and NICs only.

Each table is created whole and deleted whole (`ensure_*` define it atomically,
`delete_table` removes it with every chain and rule in it).
"""

from __future__ import annotations

from isovisor.host.network.addressing import NetworkPlan, NicPlan

# Early in ingress: before anything else on the host could see the guest's frame.
NIC_PRIORITY = -500
NET_PRIORITY = -200


def _replace(family: str, table: str, body: str) -> str:
    # `add` makes sure the table exists, so `delete` cannot fail; the whole file is one
    # transaction: the old table is replaced atomically or not at all.
    return f"add table {family} {table}\ndelete table {family} {table}\n" \
           f"table {family} {table} {{\n{body}}}\n"


def nic_ruleset(nic: NicPlan) -> str:
    mac, ip = nic.mac, nic.ip
    body = (
        "  chain ingress {\n"
        f'    type filter hook ingress device "{nic.tap}" priority {NIC_PRIORITY}; '
        "policy drop;\n"
        f"    ether saddr != {mac} counter drop\n"
        "    ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 "
        f"arp saddr ether {mac} arp saddr ip {{ {ip}, 0.0.0.0 }} accept\n"
        f"    ether type ip ip saddr {ip} accept\n"
        "    ether type ip ip saddr 0.0.0.0 ip daddr 255.255.255.255 "
        "udp sport 68 udp dport 67 accept\n"
        "    counter drop\n"
        "  }\n"
    )
    return _replace("netdev", nic.table, body)


def network_ruleset(net: NetworkPlan) -> str:
    body = (
        "  chain to_host {\n"
        f'    type filter hook ingress device "{net.bridge}" priority {NET_PRIORITY}; '
        "policy drop;\n"
        "    ether type arp arp htype 1 arp ptype ip arp hlen 6 arp plen 4 "
        f"arp daddr ip {net.gateway} accept\n"
        f"    ether type ip ip daddr {{ {net.gateway}, 255.255.255.255 }} "
        "udp sport 68 udp dport 67 accept\n"
        "    counter drop\n"
        "  }\n"
    )
    return _replace("netdev", net.table, body)


def delete_table(family: str, table: str) -> str:
    return f"add table {family} {table}\ndelete table {family} {table}\n"
