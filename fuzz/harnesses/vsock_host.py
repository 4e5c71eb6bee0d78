"""The vsock host listener's handshake: what a local client writes before the guest
accepts (`CONNECT <port>\\n`), byte by byte as it arrives. Oracle: a port in u32 range or
a refusal; never an exception, never more than MAX_LINE bytes consumed."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from fuzz.data import Data
from isovisor.devices.virtio.vsock import listener as ls
from isovisor.devices.virtio.vsock.poller import Poller

COVERS = ("host:vsock-uds",)


def one_input(data: bytes) -> None:
    d = Data(data)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dummy, _other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    poller = Poller()
    lst = ls.HostListener(dummy, Path("/nonexistent/fuzz.sock"), (0, 0))
    h = ls.Handshake(b, time.monotonic() + 60)
    try:
        shut = False
        for _ in range(8):
            if b.fileno() < 0:
                break
            chunk = d.blob(ls.MAX_LINE + 16)
            if chunk and not shut:
                a.send(chunk)
            if d.flag() and not shut:
                a.shutdown(socket.SHUT_WR)
                shut = True
            port = lst.read_line(h, poller)
            assert len(h.line) <= ls.MAX_LINE
            if port is not None:
                assert 0 <= port <= 0xFFFF_FFFF
                assert h.line.startswith(b"CONNECT ")
                break
            if b.fileno() < 0 or d.exhausted:
                break
    finally:
        for s in (a, b, dummy, _other):
            s.close()
        poller.close()
