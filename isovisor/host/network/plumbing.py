"""The host side of tenant networks: each network gets a network namespace of its own,
`PREFIX-ID` (PREFIX: the daemon's `network_namespace` setting; tests pass their own),
holding its bridge, its gateway address, its NICs' TAPs, the nftables tables of the
bridge and of those TAPs, and its dnsmasq. Nothing of one network shares a namespace with
another's, so two networks may use the same addresses, and no route, ARP table or socket
of one can see the other's. The namespace is made with the network and deleted with it.

Every operation is idempotent (`ensure_*` builds what is missing and replaces the rules;
`remove_*` removes what is there), so the daemon can replay them after a restart, and
`inventory` lists what exists (namespaces included), which is what a "nothing left
behind" test checks.

Only `ip`, `nft` and `nsenter` subprocesses are used: each call is one short-lived process
with fixed arguments built from validated ids, MACs and addresses (never from a tenant's
free text)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from isovisor.host.network import dhcp, ruleset
from isovisor.host.network.addressing import (
    BRIDGE_PREFIX,
    NET_TABLE_PREFIX,
    NIC_TABLE_PREFIX,
    TAP_PREFIX,
    NetworkPlan,
    NicPlan,
    check_netns_prefix,
    netns_name,
)
from isovisor.host.network.dhcp import DhcpError

NETNS_DIR = Path("/run/netns")
COMMAND_TIMEOUT = 30.0


class NetworkSetupError(DhcpError):
    """The host could not build or remove a network object (one sentence)."""


@dataclass(frozen=True)
class Inventory:
    namespaces: tuple[str, ...]
    bridges: tuple[str, ...]
    taps: tuple[str, ...]
    tables: tuple[str, ...]  # "family name"
    dnsmasq_pids: tuple[int, ...]

    @property
    def empty(self) -> bool:
        return not (self.namespaces or self.bridges or self.taps or self.tables
                    or self.dnsmasq_pids)


class NetworkPlumbing:
    def __init__(self, netns_prefix: str, run_root: Path) -> None:
        self.netns_prefix = check_netns_prefix(netns_prefix)
        self.run_root = run_root
        self._ours = re.compile(rf"^{re.escape(netns_prefix)}-([0-9a-f]{{8}})$")

    def netns(self, net: NetworkPlan) -> str:
        """The network namespace holding `net` and its NICs."""
        return netns_name(self.netns_prefix, net.id)

    # -- commands ------------------------------------------------------------------------

    def _run(self, argv: list[str], stdin: str | None = None, *, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        try:
            done = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT, close_fds=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NetworkSetupError(f"{argv[0]} failed: {exc}") from None
        if check and done.returncode != 0:
            raise NetworkSetupError(
                f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()[-400:]}")
        return done

    def ip(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(["ip", "-n", ns, *args], check=check)

    def inside(self, ns: str, *argv: str, stdin: str | None = None, check: bool = True
               ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in namespace `ns` (nsenter switches only the network namespace)."""
        return self._run(["nsenter", f"--net={NETNS_DIR / ns}", "--", *argv],
                         stdin, check=check)

    def nft(self, ns: str, rules: str) -> None:
        self.inside(ns, "nft", "-f", "-", stdin=rules)

    def _link_exists(self, ns: str, name: str) -> bool:
        return self.ip(ns, "link", "show", "dev", name, check=False).returncode == 0

    def _run_dir(self, network_id: str) -> Path:
        return self.run_root / network_id

    # -- namespaces ------------------------------------------------------------------------

    def _ensure_namespace(self, ns: str) -> None:
        """Create `ns` if missing; no IPv4 forwarding and no IPv6 in it, ever."""
        if shutil.which("nft") is None:
            raise NetworkSetupError("nft is missing: install Debian's nftables (`make setup`)")
        if not (NETNS_DIR / ns).exists():
            self._run(["ip", "netns", "add", ns])
        self.inside(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0",
                    "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        self.ip(ns, "link", "set", "lo", "up")
        self.run_root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _dnsmasqs_in(self, ns: str) -> list[int]:
        pids = []
        for pid in self._run(["ip", "netns", "pids", ns], check=False).stdout.split():
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            if os.path.basename(exe) == "dnsmasq":
                pids.append(int(pid))
        return pids

    def network_ids(self) -> list[str]:
        """Ids of the networks whose namespaces exist (this prefix's `PREFIX-ID` only)."""
        try:
            names = sorted(os.listdir(NETNS_DIR))
        except FileNotFoundError:
            return []
        return [m.group(1) for n in names if (m := self._ours.match(n))]

    def remove_namespace(self, network_id: str) -> None:
        """Delete a network's namespace with everything in it: its dnsmasq (stopped by pid
        file, and any other dnsmasq found inside), links, tables, and its run directory.
        (Also for a namespace no record knows: a crash between creating it and recording.)"""
        ns = netns_name(self.netns_prefix, network_id)
        run_dir = self._run_dir(network_id)
        if (NETNS_DIR / ns).exists():
            dhcp.stop_all(run_dir, self._dnsmasqs_in(ns))
            for link in self._links(ns):
                if link.startswith((TAP_PREFIX, BRIDGE_PREFIX)):
                    self.ip(ns, "link", "del", link, check=False)
            for table in self._tables(ns):
                self.nft(ns, ruleset.delete_table(*table.split()))
            self._run(["ip", "netns", "del", ns])
        shutil.rmtree(run_dir, ignore_errors=True)

    # -- networks ------------------------------------------------------------------------

    def ensure_network(self, net: NetworkPlan, nics: list[NicPlan]) -> None:
        """The namespace, the bridge (addressed with the gateway), its rules, its dnsmasq
        for `nics`."""
        ns = self.netns(net)
        self._ensure_namespace(ns)
        br = net.bridge
        if not self._link_exists(ns, br):
            self.ip(ns, "link", "add", "name", br, "type", "bridge", "stp_state", "0",
                    "mcast_snooping", "0")
        self.nft(ns, ruleset.network_ruleset(net))  # before the address: nothing unguarded
        self.ip(ns, "addr", "replace", f"{net.gateway}/{net.cidr.prefixlen}", "dev", br)
        self.ip(ns, "link", "set", br, "up")
        dhcp.start(ns, net, nics, self._run_dir(net.id))

    def refresh_dhcp(self, net: NetworkPlan, nics: list[NicPlan]) -> None:
        dhcp.start(self.netns(net), net, nics, self._run_dir(net.id))

    def remove_network(self, net: NetworkPlan) -> None:
        dhcp.stop(net, self._run_dir(net.id))
        self.remove_namespace(net.id)

    # -- NICs ----------------------------------------------------------------------------

    def ensure_nic(self, nic: NicPlan) -> None:
        """The TAP in its network's namespace, its rules (before it joins the bridge: no
        unfiltered moment), on the network's bridge, up. (The TAP's own host-side MAC
        stays random: were it the guest's, the bridge would take frames for the guest as
        its own.)"""
        ns, tap = self.netns(nic.network), nic.tap
        if not self._link_exists(ns, tap):
            self.ip(ns, "tuntap", "add", "dev", tap, "mode", "tap")
        self.nft(ns, ruleset.nic_ruleset(nic))
        self.ip(ns, "link", "set", tap, "master", nic.network.bridge)
        self.ip(ns, "link", "set", tap, "up")

    def remove_nic(self, nic: NicPlan) -> None:
        ns = self.netns(nic.network)
        if not (NETNS_DIR / ns).exists():
            return
        if self._link_exists(ns, nic.tap):
            self.ip(ns, "link", "del", nic.tap)
        self.nft(ns, ruleset.delete_table("netdev", nic.table))

    # -- what exists -----------------------------------------------------------------------

    def _links(self, ns: str) -> list[str]:
        return [line.split(":")[1].strip().split("@")[0]
                for line in self.ip(ns, "-o", "link", "show").stdout.splitlines()]

    def _tables(self, ns: str) -> list[str]:
        tables = [line.removeprefix("table ").strip()
                  for line in self.inside(ns, "nft", "list", "tables").stdout.splitlines()]
        return [t for t in tables
                if t.split()[-1].startswith((NET_TABLE_PREFIX, NIC_TABLE_PREFIX))]

    def inventory(self) -> Inventory:
        """Every isovisor network object: the namespaces of this prefix, and in them the
        bridges, TAPs, isovisor tables and dnsmasq processes."""
        namespaces, bridges, taps, tables, pids = [], [], [], [], []
        for network_id in self.network_ids():
            ns = netns_name(self.netns_prefix, network_id)
            namespaces.append(ns)
            links = self._links(ns)
            bridges += [n for n in links if n.startswith(BRIDGE_PREFIX)]
            taps += [n for n in links if n.startswith(TAP_PREFIX)]
            tables += self._tables(ns)
            pids += self._dnsmasqs_in(ns)
        return Inventory(tuple(namespaces), tuple(bridges), tuple(taps), tuple(tables),
                         tuple(pids))
