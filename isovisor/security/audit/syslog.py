"""Optional forwarding of durable entries to syslog (RFC 5424 over UDP or a Unix socket).

A copy off the host is what proves the end of the log was not cut: a forwarded checkpoint
is an anchor for `isovisor audit verify --anchor`. Forwarding is best effort and never
blocks an append: entries queue to a thread; when the queue is full they are dropped and
counted (the local log remains the record).
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from datetime import UTC, datetime

from isovisor.security.audit.entry import Entry, EntryType
from isovisor.security.audit.errors import AuditConfigError

log = logging.getLogger("isovisor.security.audit")

LOG_AUTHPRIV = 10  # syslog facility for security/authorisation messages
SEVERITY_NOTICE = 5
SEVERITY_INFO = 6
QUEUE_LIMIT = 10_000  # entries held while the receiver is slow; beyond that, dropped
_STOP = object()


def parse_address(text: str) -> tuple[int, str | tuple[str, int]]:
    """``unix:/dev/log`` or ``udp:HOST:PORT`` -> (socket family, address)."""
    if text.startswith("unix:") and len(text) > 5:
        return socket.AF_UNIX, text[5:]
    if text.startswith("udp:"):
        host, sep, port = text[4:].rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) < 65536:
            return socket.AF_INET6 if ":" in host else socket.AF_INET, (host.strip("[]"),
                                                                          int(port))
    raise AuditConfigError(f"syslog address {text!r}: expected unix:PATH or udp:HOST:PORT")


class SyslogForwarder:
    """Callable as the ``forwarder`` of an AuditLog."""

    def __init__(self, address: str, *, checkpoints_only: bool = False,
                 facility: int = LOG_AUTHPRIV, app: str = "isovisord") -> None:
        family, self._address = parse_address(address)
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._checkpoints_only = checkpoints_only
        self._facility = facility
        self._app = app
        self._host = socket.gethostname() or "-"
        self._queue: queue.Queue[object] = queue.Queue(QUEUE_LIMIT)
        self.sent = 0
        self.dropped = 0
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def __call__(self, entry: Entry) -> None:
        if self._checkpoints_only and entry.type is EntryType.RECORD:
            return
        try:
            self._queue.put_nowait(entry)
        except queue.Full:
            self.dropped += 1

    def message(self, entry: Entry) -> bytes:
        severity = SEVERITY_INFO if entry.type is EntryType.RECORD else SEVERITY_NOTICE
        pri = self._facility * 8 + severity
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return f"<{pri}>1 {now} {self._host} {self._app} - audit - ".encode() + entry.line

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            assert isinstance(item, Entry)
            try:
                self._sock.sendto(self.message(item), self._address)
                self.sent += 1
            except OSError as exc:
                self.errors += 1
                if self.errors == 1 or self.errors % 1000 == 0:
                    log.warning("audit syslog forwarding failed (%d so far): %s",
                                self.errors, exc)

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued (up to ``timeout``), then stop."""
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        self._sock.close()
