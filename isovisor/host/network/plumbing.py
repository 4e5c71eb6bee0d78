"""The host side of tenant networks, inside one network namespace (the daemon's
`network_namespace` setting; tests make their own): bridges, TAPs, nftables tables and
dnsmasqs. Every operation is idempotent (`ensure_*` builds what is missing and replaces the
rules; `remove_*` removes what is there), so the daemon can replay them after a restart,
and `inventory` lists what exists, which is what a "nothing left behind" test checks.

Only `ip`, `nft` and `nsenter` subprocesses are used: each call is one short-lived process
with fixed arguments built from validated ids, MACs and addresses (never from a tenant's
free text)."""

from __future__ import annotations

import os
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
)
from isovisor.host.network.dhcp import DhcpError

NETNS_DIR = Path("/run/netns")
COMMAND_TIMEOUT = 30.0


class NetworkSetupError(DhcpError):
    """The host could not build or remove a network object (one sentence)."""


@dataclass(frozen=True)
class Inventory:
    bridges: tuple[str, ...]
    taps: tuple[str, ...]
    tables: tuple[str, ...]  # "family name"
    dnsmasq_pids: tuple[int, ...]

    @property
    def empty(self) -> bool:
        return not (self.bridges or self.taps or self.tables or self.dnsmasq_pids)


class NetworkPlumbing:
    def __init__(self, netns: str, run_root: Path) -> None:
        self.netns = netns
        self.run_root = run_root

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

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(["ip", "-n", self.netns, *args], check=check)

    def inside(self, *argv: str, stdin: str | None = None, check: bool = True
               ) -> subprocess.CompletedProcess[str]:
        """Run `argv` in the namespace (nsenter switches only the network namespace)."""
        return self._run(["nsenter", f"--net={NETNS_DIR / self.netns}", "--", *argv],
                         stdin, check=check)

    def nft(self, rules: str) -> None:
        self.inside("nft", "-f", "-", stdin=rules)

    def _link_exists(self, name: str) -> bool:
        return self.ip("link", "show", "dev", name, check=False).returncode == 0

    def _run_dir(self, net: NetworkPlan) -> Path:
        return self.run_root / net.id

    # -- the namespace -----------------------------------------------------------------------

    def ensure_namespace(self) -> None:
        """Create the namespace if missing; no IPv6 and no routing in it, ever."""
        if shutil.which("nft") is None:
            raise NetworkSetupError("nft is missing: install Debian's nftables (`make setup`)")
        if not (NETNS_DIR / self.netns).exists():
            self._run(["ip", "netns", "add", self.netns])
        self.inside("sysctl", "-q", "-w", "net.ipv4.ip_forward=0",
                    "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        self.ip("link", "set", "lo", "up")
        self.run_root.mkdir(parents=True, exist_ok=True, mode=0o700)

    # -- networks ------------------------------------------------------------------------

    def ensure_network(self, net: NetworkPlan, nics: list[NicPlan]) -> None:
        """The bridge (addressed with the gateway), its rules, its dnsmasq for `nics`."""
        self.ensure_namespace()
        br = net.bridge
        if not self._link_exists(br):
            self.ip("link", "add", "name", br, "type", "bridge", "stp_state", "0",
                    "mcast_snooping", "0")
        self.nft(ruleset.network_ruleset(net))  # before the address: nothing unguarded
        self.ip("addr", "replace", f"{net.gateway}/{net.cidr.prefixlen}", "dev", br)
        self.ip("link", "set", br, "up")
        dhcp.start(self.netns, net, nics, self._run_dir(net))

    def refresh_dhcp(self, net: NetworkPlan, nics: list[NicPlan]) -> None:
        dhcp.start(self.netns, net, nics, self._run_dir(net))

    def remove_network(self, net: NetworkPlan) -> None:
        dhcp.stop(net, self._run_dir(net))
        if (NETNS_DIR / self.netns).exists():
            self.nft(ruleset.delete_table("netdev", net.table))
            if self._link_exists(net.bridge):
                self.ip("link", "del", net.bridge)
        shutil.rmtree(self._run_dir(net), ignore_errors=True)

    # -- NICs ----------------------------------------------------------------------------

    def ensure_nic(self, nic: NicPlan) -> None:
        """The TAP, its rules (before it joins the bridge: no unfiltered moment), on the
        network's bridge, up. (The TAP's own host-side MAC stays random: were it the
        guest's, the bridge would take frames for the guest as its own.)"""
        tap = nic.tap
        if not self._link_exists(tap):
            self.ip("tuntap", "add", "dev", tap, "mode", "tap")
        self.nft(ruleset.nic_ruleset(nic))
        self.ip("link", "set", tap, "master", nic.network.bridge)
        self.ip("link", "set", tap, "up")

    def remove_nic(self, nic: NicPlan) -> None:
        if not (NETNS_DIR / self.netns).exists():
            return
        if self._link_exists(nic.tap):
            self.ip("link", "del", nic.tap)
        self.nft(ruleset.delete_table("netdev", nic.table))

    # -- what exists -----------------------------------------------------------------------

    def inventory(self) -> Inventory:
        """Every isovisor network object in the namespace."""
        if not (NETNS_DIR / self.netns).exists():
            return Inventory((), (), (), ())
        links = [line.split(":")[1].strip().split("@")[0]
                 for line in self.ip("-o", "link", "show").stdout.splitlines()]
        tables = [line.removeprefix("table ").strip()
                  for line in self.inside("nft", "list", "tables").stdout.splitlines()]
        pids = []
        for pid in self._run(["ip", "netns", "pids", self.netns], check=False).stdout.split():
            try:
                exe = os.readlink(f"/proc/{pid}/exe")
            except OSError:
                continue
            if os.path.basename(exe) == "dnsmasq":
                pids.append(int(pid))
        return Inventory(
            bridges=tuple(n for n in links if n.startswith(BRIDGE_PREFIX)),
            taps=tuple(n for n in links if n.startswith(TAP_PREFIX)),
            tables=tuple(t for t in tables
                         if t.split()[-1].startswith((NET_TABLE_PREFIX, NIC_TABLE_PREFIX))),
            dnsmasq_pids=tuple(pids),
        )
