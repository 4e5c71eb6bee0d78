"""Control-socket messages between the host side, the zygote and a worker.

Sockets are AF_UNIX SOCK_SEQPACKET pairs: one datagram is one message, so no framing.
A message is a JSON object with an "op" string; file descriptors travel beside it with
SCM_RIGHTS. Parsing is separate from I/O (`encode`/`decode` are pure). Every message is
bounded in size and in the number of fds, and decode rejects anything else.
"""

from __future__ import annotations

import array
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from isovisor.worker.errors import ProtocolError

# A launch request with a jail report is a few KiB; anything near this is not ours.
MAX_MESSAGE_BYTES = 64 * 1024
# kvm, kernel, initrd, serial out, serial in, stderr, control, and room for the device
# backends (at most 8 disks + 8 TAPs, the vsock listener and broker: 25 in all).
MAX_FDS = 32

# host -> zygote
OP_LAUNCH = "launch"
# zygote -> host
OP_LAUNCHED = "launched"
OP_LAUNCH_FAILED = "launch-failed"
OP_EXITED = "exited"
# worker -> host
OP_READY = "ready"
OP_FAILED = "failed"
OP_STOPPED = "stopped"
OP_PONG = "pong"
OP_SECURITY_EVENT = "security-event"  # kind, source, detail: a device's security event
# host -> worker
OP_STOP = "stop"
OP_PING = "ping"
# The vsock broker, on its own socket (vsock_broker.py): the host connects <uds>_<port>
# for a guest-initiated connection and passes the socket back.
# worker -> host (vsock broker)
OP_VSOCK_CONNECT = "vsock-connect"
# host -> worker (vsock broker)
OP_VSOCK_CONNECTED = "vsock-connected"


@dataclass
class Message:
    op: str
    body: dict[str, Any] = field(default_factory=dict)
    fds: list[int] = field(default_factory=list)

    def get_str(self, key: str) -> str:
        value = self.body.get(key)
        if not isinstance(value, str):
            raise ProtocolError(f"{self.op}: field {key!r} must be a string")
        return value

    def get_int(self, key: str) -> int:
        value = self.body.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ProtocolError(f"{self.op}: field {key!r} must be an integer")
        return value


def encode(op: str, body: dict[str, Any] | None = None) -> bytes:
    data = json.dumps({"op": op, **(body or {})}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{op}: message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return data


def decode(data: bytes, fds: list[int] | None = None) -> Message:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"malformed control message: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("op"), str):
        raise ProtocolError("control message is not an object with an 'op' string")
    op = doc.pop("op")
    return Message(op, doc, list(fds or []))


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A connected SEQPACKET pair, close-on-exec both ends."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    return a, b


def send(sock: socket.socket, op: str, body: dict[str, Any] | None = None,
         fds: list[int] | tuple[int, ...] = (), *, nowait: bool = False) -> None:
    """One message; with `nowait`, raise BlockingIOError instead of waiting for room."""
    data = encode(op, body)
    if len(fds) > MAX_FDS:
        raise ProtocolError(f"{op}: {len(fds)} fds exceed {MAX_FDS}")
    anc = []
    if fds:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sock.sendmsg([data], anc, socket.MSG_DONTWAIT if nowait else 0)


def recv(sock: socket.socket) -> Message | None:
    """One message, or None at EOF. Received fds are close-on-exec and owned by the caller
    (closed here if the message is rejected)."""
    fd_size = array.array("i").itemsize
    # SAFETY: recvmsg sizes the ancillary buffer itself from CMSG_SPACE; truncated
    # control data (MSG_CTRUNC) is rejected below, never half-read.
    data, anc, flags, _ = sock.recvmsg(
        MAX_MESSAGE_BYTES + 1, socket.CMSG_SPACE(MAX_FDS * fd_size), socket.MSG_CMSG_CLOEXEC
    )
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % fd_size
            fds.extend(array.array("i", payload[:usable]))
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise ProtocolError("control message truncated (too large or too many fds)")
    if not data and not fds:
        return None
    try:
        return decode(data, fds)
    except ProtocolError:
        for fd in fds:
            os.close(fd)
        raise
