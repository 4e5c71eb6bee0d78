"""Guest-initiated vsock connections for a jailed worker: the host side connects for it.

A guest connection to host port P is a connection to the Unix socket `<uds>_P`. The
jailed worker may not connect(): its seccomp filters forbid the call, Landlock denies
every path, and after pivot_root no host path exists in its mount namespace anyway. So
the host side (the launcher's process: `isovisor run`, and through it the daemon) runs a
small broker per VM with a vsock device, on its own SOCK_SEQPACKET pair:

  worker -> host  vsock-connect {seq, port}
  host -> worker  vsock-connected {seq, ok: true} + the connected socket (SCM_RIGHTS)
                  vsock-connected {seq, ok: false, errno}

The host connects (non-blocking, as the device itself did unjailed) to `<uds>_<port>`
and nothing else: the worker chooses only the number, as the guest does, so this gives a
compromised worker no reach the device did not already have. Requests are answered one
at a time, in order; anything malformed is dropped and counted. The worker side waits
for its answer at most BROKER_TIMEOUT_S (then the guest gets RST) and discards late
answers to earlier requests by their sequence number.

The worker holds its end at fixed fd FD_VSOCK_BROKER; its filters allow sendmsg/recvmsg
on that fd and the control socket only, so no other socket can carry a descriptor out.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
import time
from pathlib import Path

from isovisor.worker import protocol
from isovisor.worker.errors import ProtocolError

log = logging.getLogger(__name__)

BROKER_TIMEOUT_S = 2.0  # the worker's wait for one answer; then the guest gets RST
MAX_PORT = 0xFFFF_FFFF


def parse_request(msg: protocol.Message) -> tuple[int, int]:
    """(seq, port) of a vsock-connect request; ProtocolError for anything else."""
    if msg.op != protocol.OP_VSOCK_CONNECT:
        raise ProtocolError(f"vsock broker: unexpected op {msg.op!r}")
    if msg.fds:
        raise ProtocolError("vsock broker: a request carries no file descriptors")
    seq, port = msg.get_int("seq"), msg.get_int("port")
    if not 0 <= port <= MAX_PORT or seq < 0:
        raise ProtocolError(f"vsock broker: port {port} / seq {seq} out of range")
    return seq, port


class VsockBroker:
    """The host side of one VM's broker: a daemon thread serving `sock` until the worker's
    end closes or `close()` is called."""

    def __init__(self, sock: socket.socket, uds: Path, name: str = "vsock-broker") -> None:
        self.sock = sock
        self.uds = uds
        self.connected = 0  # requests answered with a socket
        self.refused = 0  # requests answered ok=false (no service at <uds>_P)
        self.malformed = 0  # requests dropped
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread
        if self._thread.ident is not None:
            self._thread.join(5)
        self.sock.close()

    def _serve(self) -> None:
        while not self._closing:
            try:
                msg = protocol.recv(self.sock)
            except ProtocolError as exc:
                self.malformed += 1
                log.warning("vsock broker for %s: %s", self.uds, exc)
                continue
            except OSError:
                return
            if msg is None:
                return  # the worker is gone
            try:
                seq, port = parse_request(msg)
            except ProtocolError as exc:
                for fd in msg.fds:
                    os.close(fd)
                self.malformed += 1
                log.warning("vsock broker for %s: %s", self.uds, exc)
                continue
            try:
                self._answer(seq, port)
            except (OSError, ProtocolError):
                return  # the worker's end is gone

    def _answer(self, seq: int, port: int) -> None:
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            sock.connect(f"{self.uds}_{port}")
        except OSError as exc:  # ENOENT, ECONNREFUSED, EAGAIN (backlog full): no service
            sock.close()
            self.refused += 1
            protocol.send(self.sock, protocol.OP_VSOCK_CONNECTED,
                          {"seq": seq, "ok": False, "errno": exc.errno or errno.EIO})
            return
        self.connected += 1
        try:
            protocol.send(self.sock, protocol.OP_VSOCK_CONNECTED, {"seq": seq, "ok": True},
                          [sock.fileno()])
        finally:
            sock.close()  # the worker has its own reference now


class BrokerConnector:
    """The worker side: a vsock Connector (isovisor.devices.virtio.vsock.muxer) that asks
    the host side. Used by the vsock device's I/O thread only (one request at a time)."""

    def __init__(self, sock: socket.socket, timeout: float = BROKER_TIMEOUT_S) -> None:
        self.sock = sock
        self.timeout = timeout
        self._seq = 0

    def __call__(self, port: int) -> socket.socket | None:
        self._seq += 1
        seq = self._seq
        try:
            protocol.send(self.sock, protocol.OP_VSOCK_CONNECT, {"seq": seq, "port": port})
        except (OSError, ProtocolError):
            return None
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            try:
                msg = protocol.recv(self.sock)
            except (OSError, ProtocolError):
                return None
            if msg is None:
                return None  # the host side is gone: no more guest connections
            if msg.op != protocol.OP_VSOCK_CONNECTED or msg.body.get("seq") != seq:
                for fd in msg.fds:  # a late answer to a request that timed out
                    os.close(fd)
                continue
            if msg.body.get("ok") is True and len(msg.fds) == 1:
                return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK,
                                     0, fileno=msg.fds[0])
            for fd in msg.fds:
                os.close(fd)
            return None

    def close(self) -> None:
        self.sock.close()
