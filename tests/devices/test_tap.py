"""The TAP backend: attaching to an existing TAP (in a private namespace), creating a
transient one, the header size, offloads, frames both ways, and clear errors."""

from __future__ import annotations

import select
import socket
import sys

import pytest

from isovisor.devices.tap import (
    TAP_FLAGS,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TapError,
    check_name,
    open_tap,
)
from tests.conftest import REPO
from tests.devices.virtio.netns import ETH_P_TEST, NetNs, eth_frame, recv_matching

SRC = bytes.fromhex("020000000001")


def test_names() -> None:
    assert check_name("tap0") == "tap0"
    assert check_name("a" * 15)
    for bad in ("", "a" * 16, "a/b", "a b", "a:b", ".", ".."):
        with pytest.raises(TapError, match="not a valid interface name"):
            check_name(bad)


def test_frames_both_ways_through_an_existing_tap() -> None:
    with NetNs() as ns:
        ns.add_tap("isvtap0")
        sock = ns.packet_socket("isvtap0")
        tap = ns.open_tap("isvtap0")
        try:
            assert TAP_FLAGS == 0x5002
            frame = eth_frame(b"\xff" * 6, SRC, b"out")
            assert tap.writev([bytes(12), frame]) == 12 + len(frame)
            got = recv_matching(sock, lambda d: d[6:12] == SRC)
            assert got == frame
            reply = eth_frame(SRC, b"\x02" + bytes(5), b"in")
            sock.send(reply)
            assert select.select([tap.fd], [], [], 5)[0]
            hdr, buf = bytearray(12), bytearray(2000)
            n = None
            while n is None or buf[12:14] != ETH_P_TEST.to_bytes(2, "big"):
                n = tap.readv([hdr, buf])
                assert n is not None
            assert n == 12 + len(reply) and bytes(buf[: len(reply)]) == reply
            assert tap.readv([hdr, buf]) is None  # non-blocking: nothing more
        finally:
            tap.close()
            sock.close()
        assert tap.closed
        with pytest.raises(TapError, match="closed"):
            _ = tap.fd


def test_offloads() -> None:
    with NetNs() as ns:
        ns.add_tap("isvtap0")
        with ns.open_tap("isvtap0") as tap:
            assert tap.offloads == 0
            tap.set_offloads(TUN_F_CSUM | TUN_F_TSO4)
            assert tap.offloads == TUN_F_CSUM | TUN_F_TSO4
            with pytest.raises(TapError, match="TUNSETOFFLOAD"):
                tap.set_offloads(0x1000)  # unknown bit
            tap.set_offloads(0)


def test_errors() -> None:
    with NetNs() as ns:
        with pytest.raises(TapError, match="does not exist"):
            ns.call(lambda: open_tap("isvnone"))
        with pytest.raises(TapError, match="not a TAP"):
            ns.call(lambda: open_tap("lo"))
        ns.run("ip", "tuntap", "add", "dev", "isvtun0", "mode", "tun")
        with pytest.raises(TapError, match="not a TAP"):
            ns.call(lambda: open_tap("isvtun0"))
        ns.add_tap("isvtap0")
        with ns.open_tap("isvtap0"), pytest.raises(TapError, match="already in use"):
            ns.open_tap("isvtap0")
        # A TAP owned by uid 1234, opened as nobody without CAP_NET_ADMIN: EPERM.
        ns.run("ip", "tuntap", "add", "dev", "isvtap9", "mode", "tap", "user", "1234")
        script = (  # import as root (the interpreter's files may be root-only), then drop
            f"import os, sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from isovisor.devices.tap import TapError, open_tap\n"
            "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
            "try:\n    open_tap('isvtap9')\nexcept TapError as exc:\n    print(exc)\n"
        )
        out = ns.run(sys.executable, "-c", script).stdout
        # (Where /dev/net/tun itself is root-only, that is the refusal.)
        assert out.startswith(("TAP isvtap9: permission denied",
                               "/dev/net/tun: permission denied")), out


def test_create_makes_a_transient_tap() -> None:
    with NetNs() as ns:
        tap = ns.call(lambda: open_tap("isvtmp0", create=True))
        try:
            assert "isvtmp0" in ns.links()
        finally:
            tap.close()
        assert "isvtmp0" not in ns.links()  # gone with the descriptor


def test_lookup_is_per_namespace() -> None:
    with NetNs() as ns:
        ns.add_tap("isvonly0")
        with pytest.raises(TapError, match="does not exist"):
            open_tap("isvonly0")  # this thread is in the host namespace
        assert socket.if_nametoindex("lo") >= 1
