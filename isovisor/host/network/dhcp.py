"""The DHCP server of one tenant network: a dnsmasq bound to the network's bridge only,
DHCP only (no DNS: --port=0), answering only the NICs it was told about (static
MAC -> IP entries, `static` range: an unknown MAC gets nothing), advertising no router and
no DNS server (a network has no egress).

dnsmasq drops to `nobody` after start, keeping only CAP_NET_ADMIN (it injects ARP entries
for its unicast replies). It runs daemonised inside the network's own namespace, with
its pid in the network's run directory; the entries are its command line, so a NIC change
restarts it (DHCP clients retry). `find` recognises our dnsmasq by pid file plus command
line, so a stale pid file never makes us signal another process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from isovisor.host.errors import HostError
from isovisor.host.network.addressing import NetworkPlan, NicPlan

PID_FILE = "dnsmasq.pid"
LOG_FILE = "dnsmasq.log"
LEASE_TIME = "1h"
START_TIMEOUT = 10.0


class DhcpError(HostError):
    status = 500
    code = "NetworkSetupFailed"


def dnsmasq_binary() -> str:
    found = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    if not os.path.exists(found):
        raise DhcpError("dnsmasq is missing: install Debian's dnsmasq-base (`make setup`)")
    return found


def argv(net: NetworkPlan, nics: list[NicPlan], run_dir: Path) -> list[str]:
    out = [
        dnsmasq_binary(), "--conf-file=/dev/null", "--port=0", "--no-resolv", "--no-hosts",
        "--bind-interfaces", f"--interface={net.bridge}", "--except-interface=lo",
        f"--listen-address={net.gateway}",
        f"--dhcp-range={net.cidr.network_address},static,{net.cidr.netmask},{LEASE_TIME}",
        "--dhcp-authoritative", "--leasefile-ro", "--no-ping",
        "--dhcp-option=option:router", "--dhcp-option=option:dns-server",
        f"--pid-file={run_dir / PID_FILE}", "--log-dhcp",
        f"--log-facility={run_dir / LOG_FILE}",
    ]
    out += [f"--dhcp-host={nic.mac},{nic.ip}" for nic in nics]
    return out


def _cmdline(pid: int) -> list[bytes]:
    """The command line of `pid`: empty once it exited (a zombie's is empty too: waiting
    for whoever reaps it, a slow init in a container, cost ~2 s per dnsmasq stop)."""
    try:
        data = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return data.split(b"\0") if data else []


def find(net: NetworkPlan, run_dir: Path) -> int | None:
    """The pid of this network's dnsmasq, if it runs."""
    try:
        pid = int((run_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    if f"--interface={net.bridge}".encode() in _cmdline(pid):
        return pid
    return None


def _kill(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + timeout
    while _cmdline(pid) and time.monotonic() < end:
        time.sleep(0.01)
    if _cmdline(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop(net: NetworkPlan, run_dir: Path, timeout: float = 5.0) -> None:
    pid = find(net, run_dir)
    if pid is not None:
        _kill(pid, timeout)
    with contextlib.suppress(FileNotFoundError):
        (run_dir / PID_FILE).unlink()


def stop_all(run_dir: Path, pids: list[int], timeout: float = 5.0) -> None:
    """Stop the dnsmasqs `pids` (found inside a network's namespace, which is about to be
    deleted: nothing else of ours runs there) and forget the network's pid file."""
    for pid in pids:
        _kill(pid, timeout)
    with contextlib.suppress(FileNotFoundError):
        (run_dir / PID_FILE).unlink()


def start(netns: str, net: NetworkPlan, nics: list[NicPlan], run_dir: Path) -> int:
    """(Re)start the network's dnsmasq inside `netns` with exactly `nics`; its pid."""
    stop(net, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cmd = ["nsenter", f"--net=/run/netns/{netns}", "--", *argv(net, nics, run_dir)]
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=START_TIMEOUT, close_fds=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DhcpError(f"cannot start dnsmasq for {net.bridge}: {exc}") from None
    if done.returncode != 0:
        raise DhcpError(f"dnsmasq for {net.bridge} failed: {done.stderr.strip()[-400:]}")
    end = time.monotonic() + START_TIMEOUT
    while (pid := find(net, run_dir)) is None:
        if time.monotonic() > end:
            raise DhcpError(f"dnsmasq for {net.bridge} wrote no pid file")
        time.sleep(0.01)
    return pid
