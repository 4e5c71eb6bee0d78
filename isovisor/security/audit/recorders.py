"""What is recorded: management requests, VM lifecycle transitions, security events.

Record kinds and their data fields (all strings unless noted):

- ``api.request``: principal, action, scope, outcome (``allowed`` | ``denied`` |
  ``unauthenticated`` | ``failed``), status (int or null), request_id, client, method,
  path, time (the request's arrival, ISO 8601 UTC);
- ``vm.lifecycle``: scope (``/tenants/{t}/vms/{v}``), from, to, reason;
- ``security.<kind>``: source, detail, scope, time; kinds used by isovisor are the
  ``SECURITY_*`` constants below; device models report their own (e.g.
  ``virtio-needs-reset``). Events about one VM (``record_vm_security_event``) add
  tenant, vm_id and channel_offset (where in the VMM's events channel a malformed line
  was; null otherwise).

Strings from outside (certificate names, guest-chosen text) are cut to ``MAX_FIELD_CHARS``.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from isovisor.devices.events import SecurityEvent, SecurityEventLog
from isovisor.security.audit.entry import timestamp
from isovisor.security.audit.errors import AuditError
from isovisor.security.audit.log import Receipt

log = logging.getLogger("isovisor.security.audit")

REQUEST_KIND = "api.request"
INTENT_KIND = "api.intent"  # a mutating request about to run (its api.request follows)
VM_LIFECYCLE_KIND = "vm.lifecycle"
SECURITY_PREFIX = "security."
SECURITY_SECCOMP_KILL = "seccomp-kill"
SECURITY_NEEDS_RESET = "virtio-needs-reset"
SECURITY_INTEGRITY = "integrity-failure"
SECURITY_LAUNCH_GATE = "launch-gate-refused"
SECURITY_AUTH_FAILURE = "auth-failure"
SECURITY_QUOTA_REFUSED = "quota-refused"
# from the per-VM security events channel (event_channel.py, vm_events.py)
SECURITY_MALFORMED_EVENT = "malformed-event"
SECURITY_CHANNEL_OVERFLOW = "event-channel-overflow"
OUTCOMES = frozenset({"allowed", "denied", "unauthenticated", "failed"})

MAX_FIELD_CHARS = 4096  # keeps one hostile string from filling an entry (64 KiB limit)
# A hostile guest can raise events as fast as it likes; a VM gets this many records per
# second (burst twice that), and a summary of what was suppressed with the next one kept.
SECURITY_EVENTS_PER_SECOND = 20.0
_BAD_KIND_CHARS = re.compile(r"[^a-z0-9_.-]+")


class AuditSink(Protocol):
    """What the recorders need of an AuditLog (tests may pass a fake)."""

    def append(self, kind: str, data: dict[str, Any], *, durable: bool = True) -> Receipt: ...


def clip(value: str | None) -> str | None:
    if value is None or len(value) <= MAX_FIELD_CHARS:
        return value
    return value[:MAX_FIELD_CHARS] + f"...[{len(value) - MAX_FIELD_CHARS} more characters]"


@dataclass(frozen=True)
class RequestAudit:
    """One management request as the API saw it."""

    principal: str | None  # the verified certificate's identity; None before authentication
    action: str  # e.g. "vms/write", "tenants/read"
    scope: str  # e.g. "/tenants/acme/vms/web1"
    outcome: str  # allowed | denied | unauthenticated | failed
    request_id: str
    client: str  # address:port
    time: float  # arrival, seconds since the epoch
    status: int | None = None
    method: str | None = None
    path: str | None = None

    def data(self) -> dict[str, Any]:
        if self.outcome not in OUTCOMES:
            raise AuditError(f"request outcome {self.outcome!r} is not one of "
                             f"{sorted(OUTCOMES)}")
        return {
            "principal": clip(self.principal), "action": clip(self.action),
            "scope": clip(self.scope), "outcome": self.outcome,
            "request_id": clip(self.request_id), "client": clip(self.client),
            "time": timestamp(self.time), "status": self.status,
            "method": clip(self.method), "path": clip(self.path),
        }


def record_request(sink: AuditSink, request: RequestAudit) -> Receipt:
    """Durable before it returns: call it before the response is sent."""
    return sink.append(REQUEST_KIND, request.data())


def record_vm_transition(sink: AuditSink, *, scope: str, old: str, new: str,
                         reason: str | None = None) -> Receipt:
    return sink.append(VM_LIFECYCLE_KIND, {"scope": clip(scope), "from": old, "to": new,
                                           "reason": clip(reason)})


def security_kind(kind: str) -> str:
    """``security.`` + the event kind, reduced to the characters a record kind allows."""
    cleaned = _BAD_KIND_CHARS.sub("-", kind.lower()).strip("-.")[:55] or "unknown"
    if not cleaned[0].isalpha():
        cleaned = "x" + cleaned[:54]
    return SECURITY_PREFIX + cleaned


def record_security_event(sink: AuditSink, *, kind: str, source: str, detail: str,
                          scope: str | None = None, when: float | None = None,
                          durable: bool = True) -> Receipt:
    return sink.append(security_kind(kind), {
        "source": clip(source), "detail": clip(detail), "scope": clip(scope),
        "time": timestamp(time.time() if when is None else when),
    }, durable=durable)


def record_vm_security_event(sink: AuditSink, *, kind: str, source: str, detail: str,
                             tenant: str, vm: str, vm_id: str, when: float | None = None,
                             channel_offset: int | None = None,
                             durable: bool = False) -> Receipt:
    """A security event about one VM: ``security.<kind>`` with scope
    ``/tenants/{tenant}/vms/{vm}``, and the VM's id and tenant.

    The recorder for anything that refuses or kills a VM for security reasons, e.g. the
    launch gate (``kind=SECURITY_LAUNCH_GATE``) or a failed integrity check
    (``SECURITY_INTEGRITY``); in the daemon, ``HostAudit.vm_security_event`` calls it
    with the daemon's log. Not waited for by default (fsynced within the log's flush
    interval); pass ``durable=True`` when an API answer depends on the record.
    """
    return sink.append(security_kind(kind), {
        "source": clip(source), "detail": clip(detail),
        "scope": clip(f"/tenants/{tenant}/vms/{vm}"), "tenant": clip(tenant),
        "vm_id": clip(vm_id), "channel_offset": channel_offset,
        "time": timestamp(time.time() if when is None else when),
    }, durable=durable)


class SecurityEventBridge:
    """Feeds one VM's SecurityEventLog into the audit log.

    Runs on the reporting device's thread, so it never waits for an fsync (records are
    written at once and fsynced within the log's flush interval) and never raises.
    """

    def __init__(self, sink: AuditSink, scope: str, *,
                 rate: float = SECURITY_EVENTS_PER_SECOND,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sink = sink
        self._scope = scope
        self._rate = rate
        self._clock = clock
        self._tokens = 2 * rate
        self._last = clock()
        self._suppressed = 0
        self._lock = threading.Lock()
        self.failures = 0

    def attach(self, events: SecurityEventLog) -> None:
        events.listeners.append(self)

    def detach(self, events: SecurityEventLog) -> None:
        if self in events.listeners:
            events.listeners.remove(self)

    def __call__(self, ev: SecurityEvent) -> None:
        with self._lock:
            now = self._clock()
            self._tokens = min(2 * self._rate, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1:
                self._suppressed += 1
                return
            self._tokens -= 1
            suppressed, self._suppressed = self._suppressed, 0
        detail = ev.detail if not suppressed else (
            f"{ev.detail} ({suppressed} earlier events from this VM were not recorded: rate "
            "limit)")
        try:
            record_security_event(self._sink, kind=ev.kind, source=ev.source, detail=detail,
                                  scope=self._scope, when=ev.time, durable=False)
        except AuditError as exc:
            self.failures += 1
            log.error("security event not audited: %s", exc)
