"""The audit log of a host daemon: opened beside its state, fed by the daemon's hooks.

`HostAudit` owns the log and turns the daemon's hook calls into records:

- `before_request(RequestStart)`: the API pipeline's guard, before a request is
  authenticated or run: raises (the pipeline answers 503) once the log cannot take
  records, and writes an `api.intent` record (not waited for) for every authenticated
  mutating request, so a log that breaks silently fails on that write, before the action;
- `record_request(RequestRecord)`: the API pipeline calls it for every request before the
  first byte of the answer leaves; it returns only once the record is fsynced, and raises
  if it cannot record (the pipeline then answers 500: nothing is acknowledged unrecorded);
- `record_transition(LifecycleEvent)`: every VM state change;
- `security_event(kind, detail, client)`: authentication failures seen by the TLS server,
  and any other security event the daemon reports.

The daemon's types are matched by shape (the Protocols below), so this layer does not
import the API or host packages above it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from isovisor.security.audit.errors import AuditConfigError, AuditUnavailableError
from isovisor.security.audit.keys import load_or_generate_key
from isovisor.security.audit.log import AuditConfig, AuditLog, Forwarder
from isovisor.security.audit.recorders import (
    INTENT_KIND,
    REQUEST_KIND,
    SECURITY_AUTH_FAILURE,
    SECURITY_QUOTA_REFUSED,
    VM_LIFECYCLE_KIND,
    clip,
    record_security_event,
    record_vm_security_event,
)
from isovisor.security.audit.syslog import SyslogForwarder, parse_address

log = logging.getLogger("isovisor.security.audit")

AUDIT_DIR_NAME = "audit"  # STATE_DIR/audit
KEY_PATH = Path("keys") / "audit.key"  # STATE_DIR/keys/audit.key
SecurityEventHook = Callable[[str, str, str], None]
# API error codes that are security events too (besides the request's own record).
_SECURITY_ERRORS = {"QuotaExceeded": SECURITY_QUOTA_REFUSED,
                    "Unauthenticated": SECURITY_AUTH_FAILURE}
_TOML_TYPES: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float),
                                                   "bool": bool}
# The API server's names for security events, mapped to the audit log's.
_KIND_ALIASES = {"authentication_failure": SECURITY_AUTH_FAILURE}


class StartFacts(Protocol):
    """What the API pipeline knows of a request before it runs (pipeline.RequestStart)."""

    @property
    def request_id(self) -> str: ...
    @property
    def time(self) -> str: ...
    @property
    def client(self) -> str: ...
    @property
    def principal(self) -> str | None: ...
    @property
    def certificate_serial(self) -> str | None: ...
    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...


READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class RequestFacts(StartFacts, Protocol):
    """What the API pipeline reports about one request (isovisor.api.pipeline): what it
    knew before the request ran, and how the request was decided and answered."""

    @property
    def action(self) -> str | None: ...
    @property
    def scope(self) -> str | None: ...
    @property
    def decision(self) -> str | None: ...
    @property
    def status(self) -> int: ...
    @property
    def outcome(self) -> str: ...
    @property
    def error_code(self) -> str | None: ...


class TransitionFacts(Protocol):
    """One VM state change (isovisor.host.lifecycle.LifecycleEvent)."""

    @property
    def tenant(self) -> str: ...
    @property
    def vm(self) -> str: ...
    @property
    def vm_id(self) -> str: ...
    @property
    def previous(self) -> object: ...
    @property
    def state(self) -> object: ...
    @property
    def reason(self) -> str: ...
    @property
    def actor(self) -> str: ...
    @property
    def time(self) -> str: ...


def _state(value: object, none: str) -> str:
    if value is None:
        return none
    return str(value.value) if isinstance(value, enum.Enum) else str(value)


def start_data(s: StartFacts) -> dict[str, Any]:
    """The record fields of a request before it runs (the `api.intent` record's data)."""
    return {
        "request_id": clip(s.request_id), "time": clip(s.time), "client": clip(s.client),
        "principal": clip(s.principal), "certificate_serial": clip(s.certificate_serial),
        "method": clip(s.method), "path": clip(s.path),
    }


def request_data(r: RequestFacts) -> dict[str, Any]:
    """The `api.request` record's data: start_data's fields, then the decision and answer."""
    return {
        **start_data(r), "action": clip(r.action), "scope": clip(r.scope),
        "decision": clip(r.decision), "status": r.status, "outcome": clip(r.outcome),
        "error_code": clip(r.error_code),
    }


@dataclass(frozen=True)
class HostAuditConfig:
    """The `[audit]` table of isovisord's config file; every key optional:

        [audit]
        checkpoint_records = 256        # sign the head after this many records...
        checkpoint_seconds = 10.0       # ...or this long after the first unsigned one
        segment_bytes = 8388608         # rotate segments at this size
        durable_reads = true            # see below
        syslog = "udp:loghost:514"      # forward entries (or "unix:/dev/log"); default off
        syslog_checkpoints_only = false # forward only genesis and checkpoints
    """

    checkpoint_records: int = 256
    checkpoint_seconds: float = 10.0
    segment_bytes: int = 8 << 20
    # Durability of the records of requests that only read (GET and HEAD, answered
    # without error). True: fsynced before the answer, like every other record. False:
    # written before the answer (a killed daemon loses nothing) and fsynced within
    # flush_seconds (a power cut in that window can lose them). Mutations, denials and
    # failures are always fsynced before the answer.
    durable_reads: bool = True
    flush_seconds: float = 0.05
    syslog: str | None = None
    syslog_checkpoints_only: bool = False

    @classmethod
    def from_table(cls, table: Mapping[str, object]) -> HostAuditConfig:
        """From a parsed TOML table; unknown keys and wrong types are refused."""
        known = {f.name: f.type for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in known:
                raise AuditConfigError(f"[audit]: unknown setting {key!r}")
            want = _TOML_TYPES.get(str(known[key]), str)
            if (isinstance(value, bool) and want is not bool) or not isinstance(value, want):
                raise AuditConfigError(f"[audit] {key}: {value!r} has the wrong type")
            values[key] = value
        config = cls(**values)
        AuditConfig(Path("."), checkpoint_records=config.checkpoint_records,
                    checkpoint_seconds=config.checkpoint_seconds,
                    segment_bytes=config.segment_bytes,
                    flush_seconds=config.flush_seconds)  # range checks
        if config.syslog is not None:
            parse_address(config.syslog)
        return config


class HostAudit:
    """The daemon's audit log: STATE_DIR/audit, signed with STATE_DIR/keys/audit.key."""

    def __init__(self, state_dir: Path, config: HostAuditConfig | None = None, *,
                 forwarder: Forwarder | None = None) -> None:
        cfg = config or HostAuditConfig()
        self.durable_reads = cfg.durable_reads
        self.key = load_or_generate_key(state_dir / KEY_PATH)
        self.syslog: SyslogForwarder | None = None
        if forwarder is None and cfg.syslog is not None:
            forwarder = self.syslog = SyslogForwarder(
                cfg.syslog, checkpoints_only=cfg.syslog_checkpoints_only)
        try:
            self.log = AuditLog(AuditConfig(
                state_dir / AUDIT_DIR_NAME, checkpoint_records=cfg.checkpoint_records,
                checkpoint_seconds=cfg.checkpoint_seconds, segment_bytes=cfg.segment_bytes,
                flush_seconds=cfg.flush_seconds), self.key, forwarder=forwarder)
        except BaseException:
            if self.syslog is not None:
                self.syslog.close()
            raise

    def before_request(self, start: StartFacts) -> None:
        """The pipeline's guard: raises AuditUnavailableError when the request could not
        be recorded, so it is refused (503) before its route runs."""
        reason = self.log.unavailable
        if reason is not None:
            raise AuditUnavailableError(reason)
        if start.method in READ_METHODS or start.principal is None:
            return
        # Written now, fsynced with the request's own record: costs a write, not an fsync.
        self.log.append(INTENT_KIND, start_data(start), durable=False)

    def record_request(self, request: RequestFacts) -> None:
        """Raises AuditError when the record cannot be made durable: fail closed."""
        # Security events a request reveals; fsynced with the request's record after them.
        kind = _SECURITY_ERRORS.get(request.error_code or "")
        if kind is not None:
            record_security_event(
                self.log, kind=kind, source="api", durable=False,
                detail=f"{request.principal or 'no certificate'} {request.method} "
                       f"{request.path} from {request.client} [{request.request_id}]",
                scope=request.scope)
        read_only = (request.method in ("GET", "HEAD") and request.status < 400)
        self.log.append(REQUEST_KIND, request_data(request),
                        durable=self.durable_reads or not read_only)

    def record_transition(self, event: TransitionFacts) -> None:
        # Not waited for here: a transition made by a request is fsynced with that
        # request's own record, which follows it in the log; one the daemon observed on
        # its own (a VM exiting) within flush_seconds.
        self.log.append(VM_LIFECYCLE_KIND, {
            "scope": clip(f"/tenants/{event.tenant}/vms/{event.vm}"),
            "vm_id": clip(event.vm_id), "from": _state(event.previous, "created"),
            "to": _state(event.state, "deleted"), "reason": clip(event.reason),
            "actor": clip(event.actor), "time": clip(event.time),
        }, durable=False)

    def security_event(self, kind: str, detail: str, client: str) -> None:
        """The ApiServer's security hook; never raises into the server."""
        try:
            kind = _KIND_ALIASES.get(kind, kind)
            record_security_event(self.log, kind=kind, source="api",
                                  detail=f"{detail} (client {client})", durable=False)
        except Exception:
            log.exception("security event not audited: %s %s", kind, detail)

    def vm_security_event(self, kind: str, *, tenant: str, vm: str, vm_id: str,
                          source: str, detail: str, durable: bool = True) -> None:
        """A security event about one VM (launch gate, integrity check, ...): recorded as
        ``security.<kind>`` with the VM's scope, id and tenant. Durable before it returns
        by default; raises AuditError if it cannot be recorded."""
        record_vm_security_event(self.log, kind=kind, source=source, detail=detail,
                                 tenant=tenant, vm=vm, vm_id=vm_id, durable=durable)

    def security_hook(self, then: SecurityEventHook | None = None) -> SecurityEventHook:
        """`security_event`, followed by another hook if the daemon has one."""
        if then is None:
            return self.security_event

        def both(kind: str, detail: str, client: str) -> None:
            self.security_event(kind, detail, client)
            then(kind, detail, client)

        return both

    def close(self) -> None:
        self.log.close()
        if self.syslog is not None:
            self.syslog.close()
