"""Tenant virtual networks: each network is one Linux bridge (its own L2 segment) in a
network namespace of its own (`PREFIX-ID`), with a DHCP-only dnsmasq bound to it; each VM
NIC is a TAP on exactly one bridge, in that namespace, behind nftables rules that let it
send only from its own MAC and IP. Two tenants may use the same CIDR.

    addressing  CIDRs, host names of bridges/TAPs/tables, MAC and IP allocation rules
    ruleset     the nftables rules, as text (no I/O)
    dhcp        the per-network dnsmasq
    plumbing    creates and removes namespaces, bridges, TAPs, rules and dnsmasqs
    store       the SQLite records (networks, NICs)
"""
