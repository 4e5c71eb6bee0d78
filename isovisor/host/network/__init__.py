"""Tenant virtual networks: each network is one Linux bridge (its own L2 segment) in the
daemon's network namespace, with a DHCP-only dnsmasq bound to it; each VM NIC is a TAP on
exactly one bridge, behind nftables rules that let it send only from its own MAC and IP.

    addressing  CIDRs, host names of bridges/TAPs/tables, MAC and IP allocation rules
    ruleset     the nftables rules, as text (no I/O)
    dhcp        the per-network dnsmasq
    plumbing    creates and removes bridges, TAPs, rules and dnsmasqs in the namespace
    store       the SQLite records (networks, NICs)
"""
