"""The per-VM security events channel: how a VMM's security events reach the daemon.

`isovisor run --security-events FILE` (the daemon passes RUN_DIR/events.jsonl) appends one
JSON line per security event it sees: its jailed worker's device events (forwarded over
the control socket), the worker's death by seccomp (reported by the host side), or, with
--no-jail, its own devices' events. The daemon tails the file (`ChannelReader`) and records
every event in its audit log with the VM's id and tenant (`vm_events.VmEventWatcher`).

A file, not a socket: the VMM never waits for the daemon, and events written while the
daemon is down (a restart; VMs outlive it) are read when it re-adopts the VM.

ATTACK SURFACE (security/surface.json, "vmm-security-events"): the file is written by a
process that runs guest-facing code, so the reader treats every byte as hostile: a line
is at most `MAX_LINE_BYTES`, a read takes at most `READ_CHUNK` bytes, the reader stops
after `MAX_CHANNEL_BYTES` in all, and a line that is not exactly a valid event is returned
as a `MalformedLine` (recorded as such, with its hash) instead of being trusted or
crashing anything. Fuzzed by fuzz/harnesses/event_channel.py.

Line format (the writer's, also what the reader accepts; keys exactly these):

    {"detail":"...","kind":"virtio-needs-reset","source":"virtio-rng@0xd0000000","time":1764190000.5,"v":1}
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from isovisor.devices.events import SecurityEvent

log = logging.getLogger("isovisor.security.audit")

FORMAT_VERSION = 1
MAX_LINE_BYTES = 4096  # one event line, newline included
MAX_KIND_CHARS = 64
MAX_SOURCE_CHARS = 256
MAX_DETAIL_CHARS = 2048
READ_CHUNK = 64 << 10  # bytes read from one VM's channel per poll
MAX_CHANNEL_BYTES = 16 << 20  # the reader stops after this much of one channel
WRITER_MAX_BYTES = 1 << 20  # the writer stops after this much (a flood fills no disk)
WRITER_EVENTS_PER_SECOND = 20.0  # burst twice that; the rest counted, not written
_KIND = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_KEYS = frozenset({"v", "kind", "source", "detail", "time"})


class EventLineError(ValueError):
    """A channel line that is not a valid event."""


@dataclass(frozen=True)
class ChannelEvent:
    kind: str
    source: str
    detail: str
    time: float


@dataclass(frozen=True)
class MalformedLine:
    """A line the reader refused, for the audit log: never its content, only facts."""

    offset: int  # where it starts in the channel
    length: int  # its length in bytes (for an overlong line: at least this)
    sha256: str  # of the bytes seen (at most MAX_LINE_BYTES of them)
    reason: str
    prefix: str  # the first bytes, escaped (ASCII, printable)


@dataclass(frozen=True)
class ChannelOverflow:
    offset: int


ChannelItem = ChannelEvent | MalformedLine | ChannelOverflow


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def encode_event(kind: str, source: str, detail: str, when: float) -> bytes:
    """One channel line (newline included); see `encode_line` for the size bound."""
    kind = kind if _KIND.match(kind) else "unknown"
    doc = {"v": FORMAT_VERSION, "kind": kind, "source": _clip(source, MAX_SOURCE_CHARS),
           "detail": _clip(detail, MAX_DETAIL_CHARS),
           "time": when if math.isfinite(when) else 0.0}
    line = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return line.encode("ascii") + b"\n"


def encode_line(kind: str, source: str, detail: str, when: float) -> bytes:
    """`encode_event`, with the detail cut further until the line fits MAX_LINE_BYTES
    (escaping can make a 2048-character detail up to six times as long)."""
    line = encode_event(kind, source, detail, when)
    while len(line) > MAX_LINE_BYTES:
        detail = detail[:max(0, len(detail) // 2)]
        source = source[:max(0, len(source) // 2)]
        line = encode_event(kind, source, detail, when)
    return line


def parse_event_line(line: bytes) -> ChannelEvent:
    """A line without its newline -> the event, or EventLineError naming what is wrong."""
    if len(line) >= MAX_LINE_BYTES:
        raise EventLineError(f"longer than {MAX_LINE_BYTES - 1} bytes")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise EventLineError("not ASCII") from None
    try:
        doc = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise EventLineError(f"not JSON ({str(exc)[:80]})") from None
    if not isinstance(doc, dict):
        raise EventLineError("not a JSON object")
    if set(doc) != _KEYS:
        raise EventLineError("keys are not exactly " + ", ".join(sorted(_KEYS)))
    if doc["v"] != FORMAT_VERSION or isinstance(doc["v"], bool):
        raise EventLineError(f"unknown version (expected {FORMAT_VERSION})")
    kind, source, detail, when = doc["kind"], doc["source"], doc["detail"], doc["time"]
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise EventLineError("kind is not 1-64 characters of a-z, 0-9, '.', '_', '-'")
    if not isinstance(source, str) or len(source) > MAX_SOURCE_CHARS:
        raise EventLineError(f"source is not a string of at most {MAX_SOURCE_CHARS}")
    if not isinstance(detail, str) or len(detail) > MAX_DETAIL_CHARS:
        raise EventLineError(f"detail is not a string of at most {MAX_DETAIL_CHARS}")
    if isinstance(when, bool) or not isinstance(when, int | float) or not (
            math.isfinite(when) and 0 <= when < 1e11):
        raise EventLineError("time is not a number of seconds since the epoch")
    return ChannelEvent(kind, source, detail, float(when))


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _escaped_prefix(data: bytes, limit: int = 120) -> str:
    return data[:limit].decode("ascii", "backslashreplace").encode(
        "unicode_escape").decode("ascii")


# -- the writer (in `isovisor run`) ---------------------------------------------------------

class ChannelWriter:
    """A SecurityEventLog listener that appends each event to the channel file.

    Never raises and never blocks for long (a plain append to a local file); rate-limited
    and capped in total, because a hostile guest can raise events as fast as it likes.
    """

    def __init__(self, path: Path, *, rate: float = WRITER_EVENTS_PER_SECOND,
                 max_bytes: int = WRITER_MAX_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                           | os.O_NOFOLLOW, 0o600)
        self._rate = rate
        self._max_bytes = max_bytes
        self._clock = clock
        self._tokens = 2 * rate
        self._last = clock()
        self._suppressed = 0
        self._written = os.fstat(self._fd).st_size
        self._lock = threading.Lock()
        self.dropped = 0

    def __call__(self, ev: SecurityEvent) -> None:
        self.write(ev.kind, ev.source, ev.detail, ev.time)

    def write(self, kind: str, source: str, detail: str, when: float) -> None:
        with self._lock:
            if self._fd < 0:
                return
            now = self._clock()
            self._tokens = min(2 * self._rate, self._tokens + (now - self._last) * self._rate)
            self._last = now
            if self._tokens < 1:
                self._suppressed += 1
                self.dropped += 1
                return
            self._tokens -= 1
            if self._suppressed:
                detail = (f"{detail} ({self._suppressed} earlier events were not written: "
                          "rate limit)")
                self._suppressed = 0
            line = encode_line(kind, source, detail, when)
            if self._written + len(line) > self._max_bytes:
                self.dropped += 1
                return
            try:
                os.write(self._fd, line)
                self._written += len(line)
            except OSError as exc:
                self.dropped += 1
                log.error("security event not written to %s: %s", self.path, exc)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


# -- the reader (in the daemon) -------------------------------------------------------------

class ChannelReader:
    """Reads one channel file from a position, bounded; keeps no more than one line."""

    def __init__(self, path: Path, offset: int = 0, inode: int | None = None) -> None:
        self.path = path
        self.offset = offset  # the first byte not yet consumed
        self.inode = inode
        self._overflowed = False

    def read(self, *, final: bool = False) -> list[ChannelItem]:
        """What was appended since the last call (at most READ_CHUNK bytes' worth). With
        `final` (the VMM has exited), an incomplete last line is returned as malformed."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return []
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return [] if self._overflowed else self._overflow_once(
                    "the channel is not a regular file")
            if self.inode != st.st_ino or st.st_size < self.offset:
                # a new file (the VM was started again) or one cut short: from its start
                self.inode, self.offset, self._overflowed = st.st_ino, 0, False
            if self._overflowed:
                return []
            if self.offset >= MAX_CHANNEL_BYTES:
                return self._overflow_once("the channel grew past its limit")
            want = min(READ_CHUNK, MAX_CHANNEL_BYTES - self.offset, st.st_size - self.offset)
            data = os.pread(fd, want, self.offset) if want > 0 else b""
        finally:
            os.close(fd)
        return self._split(data, final=final and len(data) == want)

    def _overflow_once(self, why: str) -> list[ChannelItem]:
        self._overflowed = True
        log.warning("security events channel %s: %s", self.path, why)
        return [ChannelOverflow(self.offset)]

    def _split(self, data: bytes, *, final: bool) -> list[ChannelItem]:
        items: list[ChannelItem] = []
        pos = 0
        while pos < len(data):
            end = data.find(b"\n", pos, pos + MAX_LINE_BYTES)
            start = self.offset + pos
            if end < 0:
                rest = data[pos:]
                if len(rest) >= MAX_LINE_BYTES:  # no newline within the limit: skip it
                    cut = data.find(b"\n", pos + MAX_LINE_BYTES)
                    seen = rest[:MAX_LINE_BYTES]
                    items.append(MalformedLine(
                        start, len(rest) if cut < 0 else cut - pos,
                        hashlib.sha256(seen).hexdigest(),
                        f"longer than {MAX_LINE_BYTES - 1} bytes", _escaped_prefix(seen)))
                    pos = len(data) if cut < 0 else cut + 1
                    if cut < 0:
                        # the rest of the overlong line comes later: skip to its newline
                        self.offset += pos
                        return items + self._skip_rest()
                    continue
                if final:  # the writer is gone: this line will never be finished
                    items.append(MalformedLine(start, len(rest),
                                               hashlib.sha256(rest).hexdigest(),
                                               "incomplete (no newline at the end)",
                                               _escaped_prefix(rest)))
                    pos = len(data)
                break
            line = data[pos:end]
            try:
                items.append(parse_event_line(line))
            except EventLineError as exc:
                items.append(MalformedLine(start, len(line), hashlib.sha256(line).hexdigest(),
                                           str(exc), _escaped_prefix(line)))
            pos = end + 1
        self.offset += pos
        return items

    def _skip_rest(self) -> list[ChannelItem]:
        """Consume up to the next newline (the tail of an overlong line), bounded."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return []
        try:
            while self.offset < MAX_CHANNEL_BYTES:
                chunk = os.pread(fd, READ_CHUNK, self.offset)
                if not chunk:
                    return []
                cut = chunk.find(b"\n")
                if cut >= 0:
                    self.offset += cut + 1
                    return []
                self.offset += len(chunk)
        finally:
            os.close(fd)
        return []
