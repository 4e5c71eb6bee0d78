"""Network test fixtures: a private network namespace with TAPs, packet sockets and a
dnsmasq DHCP server in it, and clean-up that leaves nothing behind.

Guest traffic only ever reaches a namespace the test made: the TAP lives in it, so a
guest's frames cannot meet the host's own interfaces. Names carry the test process's pid
(`isvtest-<pid>-<n>`); tenant-network code under test makes namespaces of its own named
after it (`isvtest-<pid>-<n>-<network id>`), removed with it. A namespace left by a test
process that died (SIGKILL) is removed the next time a namespace is made.

Code that must run "inside" the namespace without a subprocess (opening a TAP, a packet
socket) runs in a short-lived thread that setns(2)'s into it: a TAP or socket belongs to
the namespace it was opened in, whichever thread uses it later.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from isovisor.devices.tap import Tap, open_tap

T = TypeVar("T")
PREFIX = "isvtest-"
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
ETH_P_TEST = 0x88B5  # IEEE 802 local experimental ethertype 1: our test frames
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(ns: str) -> None:
    """SIGKILL every process still in namespace `ns` (a dnsmasq or VMM of a dead test)."""
    for pid in _ip("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def remove_tree(name: str) -> None:
    """Delete namespace `name` and those named `name-*` (the per-network namespaces of
    tenant networks made under it), killing every process inside first."""
    listing = _ip("netns", "list", check=False).stdout
    for child in re.findall(rf"^({re.escape(name)}-\S+)", listing, re.MULTILINE):
        _kill_inside(child)
        _ip("netns", "del", child, check=False)
    if os.path.exists(f"/run/netns/{name}"):
        _kill_inside(name)
        _ip("netns", "del", name, check=False)


def sweep_stale() -> None:
    """Delete namespaces (and the processes in them) left by test processes that no
    longer exist."""
    listing = _ip("netns", "list", check=False).stdout
    for name in re.findall(rf"^({PREFIX}(\d+)-\S+)", listing, re.MULTILINE):
        full, pid = name
        if not _pid_alive(int(pid)):
            _kill_inside(full)
            _ip("netns", "del", full, check=False)


def require_network_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("network namespace tests need root")
    if shutil.which("ip") is None:
        pytest.fail("iproute2 (`ip`) is missing")
    if not os.path.exists("/dev/net/tun"):
        pytest.fail("/dev/net/tun is missing: TAP tests cannot run")


class NetNs:
    """A network namespace of our own; use as a context manager (or call close())."""

    def __init__(self) -> None:
        require_network_tools()
        sweep_stale()
        self.name = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self._procs: list[subprocess.Popen[bytes]] = []
        self._closed = False
        _ip("netns", "add", self.name)
        try:
            # No IPv6 chatter (router solicitations, DAD, MLD) on test links.
            self.run("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                     "net.ipv6.conf.default.disable_ipv6=1")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    # --- running things inside -------------------------------------------------------------

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def nsenter_argv(self, *argv: str) -> list[str]:
        """Like argv(), but switching only the network namespace: `ip netns exec` also
        remounts /sys, which hides the cgroup hierarchies the jailed worker needs."""
        return ["nsenter", f"--net=/run/netns/{self.name}", "--", *argv]

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*argv), capture_output=True, text=True, check=True,
                              timeout=timeout)

    def popen(
        self, argv: list[str], *, net_only: bool = False, **kwargs: object
    ) -> subprocess.Popen[bytes]:
        """Start a process in the namespace (`net_only`: see nsenter_argv); it is killed
        (by pid) at close()."""
        full = self.nsenter_argv(*argv) if net_only else self.argv(*argv)
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            full, start_new_session=True, **kwargs
        )
        self._procs.append(proc)
        return proc

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` in a thread that has joined this namespace; return its result."""
        result: list[T] = []
        error: list[BaseException] = []

        def body() -> None:
            try:
                fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns: {os.strerror(err)}")
                finally:
                    os.close(fd)
                result.append(fn())
            except BaseException as exc:
                error.append(exc)

        t = threading.Thread(target=body, name=f"netns-{self.name}")
        t.start()
        t.join()
        if error:
            raise error[0]
        return result[0]

    # --- links ----------------------------------------------------------------------------

    def add_tap(self, name: str, address: str | None = None, *, mtu: int | None = None) -> str:
        """A persistent TAP `name` (up; with `address`, e.g. '10.201.0.1/24')."""
        _ip("-n", self.name, "tuntap", "add", "dev", name, "mode", "tap")
        if mtu is not None:
            _ip("-n", self.name, "link", "set", name, "mtu", str(mtu))
        if address is not None:
            _ip("-n", self.name, "addr", "add", address, "dev", name)
        _ip("-n", self.name, "link", "set", name, "up")
        return name

    def open_tap(self, name: str) -> Tap:
        """Attach to TAP `name` and wait until it can carry frames (see wait_carrier)."""
        tap = self.call(lambda: open_tap(name))
        try:
            self.wait_carrier(name)
        except BaseException:
            tap.close()
            raise
        return tap

    def wait_carrier(self, name: str, timeout: float = 10.0) -> None:
        """Wait until `name` has carrier and a real qdisc. A TAP gets carrier when a reader
        attaches, but the kernel's linkwatch swaps its noop qdisc for a real one only up to
        a second later: frames sent to it before then are silently dropped."""
        end = time.monotonic() + timeout
        while True:
            line = _ip("-n", self.name, "-o", "link", "show", "dev", name).stdout
            if "LOWER_UP" in line and "qdisc noop" not in line:
                return
            if time.monotonic() > end:
                raise AssertionError(f"{name} has no carrier: {line}")
            time.sleep(0.02)

    def packet_socket(self, ifname: str, proto: int = ETH_P_ALL) -> socket.socket:
        """A raw AF_PACKET socket bound to `ifname` in this namespace."""

        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(proto))
            try:
                s.bind((ifname, proto))
            except BaseException:
                s.close()
                raise
            return s

        return self.call(make)

    def links(self) -> str:
        return _ip("-n", self.name, "-o", "link").stdout

    # --- dnsmasq ----------------------------------------------------------------------------

    def start_dnsmasq(
        self, ifname: str, first: str, last: str, log: Path, timeout: float = 20.0
    ) -> subprocess.Popen[bytes]:
        """A DHCP-only dnsmasq on `ifname` handing out first..last; waits until it serves."""
        dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        if not os.path.exists(dnsmasq):
            pytest.fail("dnsmasq is missing: run `make setup` (the Makefile installs it)")
        argv = [
            dnsmasq, "--no-daemon", "--conf-file=/dev/null", "--port=0", "--no-resolv",
            "--no-hosts", "--bind-interfaces", f"--interface={ifname}",
            "--except-interface=lo", f"--dhcp-range={first},{last},255.255.255.0,1h",
            "--dhcp-authoritative", "--leasefile-ro", "--pid-file=", "--log-dhcp",
            "--log-facility=-",
        ]
        with log.open("wb") as out:
            proc = self.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise AssertionError(f"dnsmasq exited {proc.returncode}: {log.read_text()}")
            if "DHCP, IP range" in log.read_text(errors="replace"):
                return proc
            time.sleep(0.05)
        raise AssertionError(f"dnsmasq did not start: {log.read_text(errors='replace')}")

    # --- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # its own session: ours only
                except ProcessLookupError:
                    pass
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Anything a started process left behind in there (and in per-network namespaces
        # made under our name); deleting a namespace removes its TAPs and veths with it.
        remove_tree(self.name)

    @classmethod
    def existing(cls, name: str) -> NetNs:
        """These helpers for a namespace someone else made (a tenant network's, by
        NetworkPlumbing); close() leaves it to its maker."""
        ns = cls.__new__(cls)
        ns.name, ns._procs, ns._closed = name, [], True
        return ns

    def __enter__(self) -> NetNs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def namespaces_left() -> list[str]:
    """This process's namespaces that still exist (a clean-up check for tests)."""
    listing = _ip("netns", "list", check=False).stdout
    return re.findall(rf"^({PREFIX}{os.getpid()}-\S+)", listing, re.MULTILINE)


@contextmanager
def netns() -> Iterator[NetNs]:
    ns = NetNs()
    try:
        yield ns
    finally:
        ns.close()


def eth_frame(dst: bytes, src: bytes, payload: bytes, ethertype: int = ETH_P_TEST) -> bytes:
    """An Ethernet frame, padded to the 60-byte minimum."""
    frame = dst + src + ethertype.to_bytes(2, "big") + payload
    return frame.ljust(60, b"\0")


def recv_matching(
    sock: socket.socket, pred: Callable[[bytes], bool], timeout: float = 5.0
) -> bytes:
    """The next frame on `sock` for which `pred` holds (others are skipped)."""
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError("no matching frame arrived")
        sock.settimeout(left)
        try:
            data = sock.recv(70000)
        except TimeoutError:
            raise AssertionError("no matching frame arrived") from None
        if pred(data):
            return data
