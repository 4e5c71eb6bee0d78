"""Security events raised inside a worker (a device put into NEEDS_RESET by malformed
guest data, ...) are sent to the host side over the control socket, which writes them to
the VM's security events channel (isovisor.security.audit.event_channel).

Devices report on their own threads, whose seccomp filters allow no socket calls: the
listener only queues (bounded: a hostile guest can raise events as fast as it likes);
the control thread sends what is queued on each turn of its loop, never waiting for room
(a host that does not read loses events, counted, rather than stalling the worker)."""

from __future__ import annotations

import socket
import threading
from collections import deque

from isovisor.devices.events import SecurityEvent
from isovisor.worker import protocol
from isovisor.worker.errors import ProtocolError

MAX_QUEUED = 64


class EventForwarder:
    def __init__(self) -> None:
        self._queue: deque[SecurityEvent] = deque()
        self._lock = threading.Lock()
        self.dropped = 0
        self.sent = 0

    def __call__(self, ev: SecurityEvent) -> None:
        with self._lock:
            if len(self._queue) >= MAX_QUEUED:
                self.dropped += 1
                return
            self._queue.append(ev)

    def flush(self, control: socket.socket) -> None:
        """Send what is queued (control thread only)."""
        with self._lock:
            pending, self._queue = self._queue, deque()
            dropped, self.dropped = self.dropped, 0
        for i, ev in enumerate(pending):
            detail = ev.detail
            if i == 0 and dropped:
                detail += f" ({dropped} earlier events were dropped in the worker)"
            try:
                protocol.send(control, protocol.OP_SECURITY_EVENT,
                              {"kind": ev.kind[:64], "source": ev.source[:256],
                               "detail": detail[:2048], "time": ev.time}, nowait=True)
                self.sent += 1
            except (OSError, ProtocolError):
                with self._lock:
                    self.dropped += len(pending) - i
                return
