"""Security events raised by device models (a hostile or broken guest driver, for example).

Devices report; the VMM keeps the events, logs them, and (once the audit log exists)
forwards them. Reporting never raises and never blocks a device for long.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("isovisor.security")

# Keep the newest events only: a hostile guest must not grow host memory without bound.
MAX_KEPT_EVENTS = 1024


@dataclass(frozen=True)
class SecurityEvent:
    kind: str  # e.g. "virtio-needs-reset", "seccomp-kill"
    source: str  # the device or component, e.g. "virtio-blk@0xd0000000"
    detail: str
    time: float


class SecurityEventSink(Protocol):
    def report(self, kind: str, source: str, detail: str) -> None: ...


class SecurityEventLog:
    """A bounded, thread-safe record of security events with optional listeners."""

    def __init__(self, limit: int = MAX_KEPT_EVENTS) -> None:
        self._events: deque[SecurityEvent] = deque(maxlen=limit)
        self._lock = threading.Lock()
        self.total = 0
        self.listeners: list[Callable[[SecurityEvent], None]] = []

    def report(self, kind: str, source: str, detail: str) -> None:
        ev = SecurityEvent(kind, source, detail, time.time())
        with self._lock:
            self._events.append(ev)
            self.total += 1
            listeners = list(self.listeners)
        log.warning("security event %s from %s: %s", kind, source, detail)
        for listener in listeners:
            try:
                listener(ev)
            except Exception:
                log.exception("security event listener failed")

    def events(self) -> list[SecurityEvent]:
        with self._lock:
            return list(self._events)
