"""The measured-launch event log: every measurement extended into a PCR, in order.

Each event names its PCR, the measurement and its value; the extended digest is
SHA-256("isovisor-event-v1" NUL name NUL value), recomputed from name and value on every
replay (a stored digest is never trusted). `replay` folds the events into the PCR values
the TPM must hold: PCR := SHA-256(PCR || digest), from all zeros at TPM reset.

The log belongs to one TPM boot: `boot` holds the TPM's (resetCount, restartCount) when it
was begun, and a log from another boot is discarded. The file is replaced atomically and
guarded by an flock, so `isovisor attest` reads a log consistent with the PCRs it quotes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from isovisor.security.integrity.errors import EventLogError

SCHEMA = 1
DOMAIN = b"isovisor-event-v1"
ZERO = bytes(32)
MAX_EVENTS = 100_000  # measurements change rarely; bounds a hostile log given to a verifier
MAX_LOG_BYTES = 64 << 20


def event_digest(name: str, value: str) -> bytes:
    return hashlib.sha256(DOMAIN + b"\0" + name.encode() + b"\0" + value.encode()).digest()


def extend(pcr_value: bytes, digest: bytes) -> bytes:
    return hashlib.sha256(pcr_value + digest).digest()


@dataclass(frozen=True)
class Event:
    pcr: int
    name: str
    value: str

    @property
    def digest(self) -> bytes:
        return event_digest(self.name, self.value)


@dataclass
class EventLog:
    boot: tuple[int, int]
    pcrs: list[int]
    events: list[Event] = field(default_factory=list)

    def replay(self) -> dict[int, bytes]:
        values = {p: ZERO for p in self.pcrs}
        for ev in self.events:
            if ev.pcr not in values:
                raise EventLogError(f"event {ev.name!r} is for PCR {ev.pcr}, which the log "
                                    f"does not cover ({self.pcrs})")
            values[ev.pcr] = extend(values[ev.pcr], ev.digest)
        return values

    def latest(self) -> dict[str, str]:
        """The last measured value of each name."""
        return {ev.name: ev.value for ev in self.events}

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "boot": list(self.boot), "pcrs": self.pcrs,
                "events": [asdict(ev) | {"digest": ev.digest.hex()} for ev in self.events]}

    @classmethod
    def from_json(cls, obj: Any) -> EventLog:
        try:
            if obj["schema"] != SCHEMA:
                raise EventLogError(f"event log schema {obj['schema']!r} is not {SCHEMA}")
            boot = obj["boot"]
            pcrs = obj["pcrs"]
            raw = obj["events"]
            if (not isinstance(boot, list) or len(boot) != 2
                    or not all(type(b) is int for b in boot)
                    or not isinstance(pcrs, list) or not all(type(p) is int for p in pcrs)
                    or not isinstance(raw, list) or len(raw) > MAX_EVENTS):
                raise EventLogError("event log: malformed boot, pcrs or events")
            events = []
            for i, e in enumerate(raw):
                if not (isinstance(e, dict) and type(e.get("pcr")) is int
                        and isinstance(e.get("name"), str) and isinstance(e.get("value"), str)):
                    raise EventLogError(f"event log: event #{i} is malformed")
                events.append(Event(e["pcr"], e["name"], e["value"]))
        except (KeyError, TypeError) as exc:
            raise EventLogError(f"event log: missing or wrong field {exc}") from None
        return cls((boot[0], boot[1]), pcrs, events)


class EventLogFile:
    """The daemon's copy on disk (STATE/integrity/eventlog.json)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def locked(self, exclusive: bool = True) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def load(self) -> EventLog | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_LOG_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EventLogError(f"cannot read the event log {self.path}: {exc}") from exc
        if len(raw) > MAX_LOG_BYTES:
            raise EventLogError(f"the event log {self.path} is too large")
        try:
            return EventLog.from_json(json.loads(raw))
        except ValueError as exc:
            raise EventLogError(f"the event log {self.path} is not JSON: {exc}") from exc

    def save(self, log: EventLog) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(log.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
