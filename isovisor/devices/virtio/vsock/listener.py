"""Host-initiated connections: the listening Unix socket at `<uds>` and its handshake.

A host client connects to `<uds>` and writes one line, `CONNECT <port>\\n` (port: the
guest's vsock port, decimal). The device sends the guest a REQUEST; when the guest answers
RESPONSE the client reads `OK <local_port>\\n` (the host-side port the guest sees) and from
then on the socket carries the stream. If the guest refuses (RST) or does not answer in
time, the socket is closed without an OK line. A malformed line, a line longer than
MAX_LINE, or no line within HANDSHAKE_TIMEOUT also closes the socket.

The handshake reads with MSG_PEEK first and then exactly up to the newline, so bytes the
client sends right after the line stay in the socket for the guest.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
from dataclasses import dataclass
from pathlib import Path

from isovisor.devices.virtio.vsock.poller import Poller
from isovisor.devices.virtio.vsock.spec import VsockConfigError

MAX_LINE = 32  # "CONNECT 4294967295\n" is 19 bytes
HANDSHAKE_TIMEOUT = 5.0  # seconds for a client to send its CONNECT line
MAX_HANDSHAKES = 16  # clients between accept and CONNECT; more are closed at once
ACCEPTS_PER_EVENT = 16  # bounded work per wakeup; the rest wait (level-triggered)
LISTEN_BACKLOG = 16
_CONNECT = re.compile(rb"CONNECT ([0-9]{1,10})\n")
_U32 = 0xFFFF_FFFF


def bind_listener(path: Path) -> HostListener:
    """A listening Unix stream socket at `path`, mode 0600 (VsockConfigError on failure).

    The mode is set between bind and listen: nobody can connect before listen(), so there
    is no window with looser permissions."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(os.fsencode(path))
        os.chmod(path, 0o600)
        st = os.stat(path)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise VsockConfigError(f"vsock socket {path}: {exc.strerror or exc}") from None
    return HostListener(sock, path, (st.st_dev, st.st_ino))


@dataclass
class Handshake:
    sock: socket.socket
    deadline: float
    line: bytes = b""  # consumed so far, no newline in it yet


class HostListener:
    """The accept side: pending handshakes, bounded in number and time."""

    def __init__(self, sock: socket.socket, path: Path, ident: tuple[int, int] | None) -> None:
        self.sock = sock
        self.path = path
        # (st_dev, st_ino) of the socket file we bound; None: someone else bound it (the
        # jailed worker gets the socket from its host side, which removes the path)
        self._ident = ident
        self.handshakes: dict[int, Handshake] = {}
        self.refused = 0  # clients closed: too many pending, bad line, timeout

    def start(self, poller: Poller) -> None:
        poller.set(self.sock.fileno(), select.EPOLLIN, self)

    def accept(self, poller: Poller, now: float) -> None:
        for _ in range(ACCEPTS_PER_EVENT):
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ECONNABORTED, EMFILE...: the next readiness retries
            client.setblocking(False)
            if len(self.handshakes) >= MAX_HANDSHAKES:
                self.refused += 1
                client.close()
                continue
            h = Handshake(client, now + HANDSHAKE_TIMEOUT)
            self.handshakes[client.fileno()] = h
            poller.set(client.fileno(), select.EPOLLIN, h)

    def read_line(self, h: Handshake, poller: Poller) -> int | None:
        """Advance handshake `h`; the guest port once its line is complete (the socket is
        then no longer the listener's), None while waiting or after refusing it."""
        room = MAX_LINE - len(h.line)
        try:
            peek = h.sock.recv(room, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            end = peek.find(b"\n")
            # Consume what was peeked (a partial line: level-triggered epoll would report
            # the bytes again and again), but never past the newline.
            got = h.sock.recv(len(peek) if end < 0 else end + 1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError:
            self.refuse(h, poller)
            return None
        h.line += got
        if end < 0:
            if not peek or len(h.line) >= MAX_LINE:
                self.refuse(h, poller)  # EOF before the line, or no newline in MAX_LINE
            return None
        m = _CONNECT.fullmatch(h.line)
        if m is None or int(m.group(1)) > _U32:
            self.refuse(h, poller)
            return None
        self._forget(h, poller)
        return int(m.group(1))

    def refuse(self, h: Handshake, poller: Poller) -> None:
        self.refused += 1
        self._forget(h, poller)
        h.sock.close()

    def _forget(self, h: Handshake, poller: Poller) -> None:
        fd = h.sock.fileno()
        poller.drop(fd)
        self.handshakes.pop(fd, None)

    def next_deadline(self) -> float | None:
        return min((h.deadline for h in self.handshakes.values()), default=None)

    def expire(self, poller: Poller, now: float) -> None:
        for h in [h for h in self.handshakes.values() if now >= h.deadline]:
            self.refuse(h, poller)

    def stop(self, poller: Poller) -> None:
        """Close pending handshakes and stop accepting (device reset)."""
        for h in list(self.handshakes.values()):
            self._forget(h, poller)
            h.sock.close()
        poller.drop(self.sock.fileno())

    def close(self) -> None:
        """VM teardown: close the listening socket and remove its path (if still ours)."""
        self.sock.close()
        if self._ident is None:
            return
        try:
            st = os.lstat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._ident:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
