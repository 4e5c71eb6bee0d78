"""The writer: append records durably, checkpoint, rotate, recover after a crash.

Durability: ``append`` returns only after the entry's bytes are fsynced. With group commit
(the default) concurrent appenders share one fsync: each caller writes its line under the
lock, then waits until the durable position passes the end of its line. A caller finding
no fsync in flight becomes the leader: it notes how far the log has been written, fsyncs,
and publishes that position. An fsync that starts after a write has completed covers it,
so no caller returns before its own bytes are on disk; a rotation fsyncs the old segment
before the new one is opened, so a leader's fsync of the current segment is always enough.

Fail closed: if a write or fsync fails, the log stops taking records and every caller gets
``AuditUnavailableError``; the daemon must then refuse the actions it cannot record.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

from isovisor.security.audit.chain import Location, Seen, walk
from isovisor.security.audit.entry import (
    FORMAT_VERSION,
    GENESIS_PREV,
    MAX_ENTRY_BYTES,
    SIGNATURE_CONTEXT,
    Entry,
    EntryType,
    canonical,
    canonical_text,
    check_depth,
    check_kind,
    decode,
    encode,
    record_line,
    sha256_hex,
    timestamp_ns,
)
from isovisor.security.audit.errors import (
    AuditBusyError,
    AuditConfigError,
    AuditCorruptError,
    AuditError,
    AuditRecordError,
    AuditUnavailableError,
    EntryFormatError,
)
from isovisor.security.audit.keys import (
    PUBLIC_MODE,
    AuditSigningKey,
    fsync_dir,
    public_raw,
    write_file,
)
from isovisor.security.audit.segments import (
    LOCK_NAME,
    PUBLIC_KEY_NAME,
    Segment,
    check_writable_only_by_us,
    ensure_log_dir,
    iter_lines,
    last_complete_line,
    list_segments,
    open_segment_for_append,
    segment_name,
)

log = logging.getLogger("isovisor.security.audit")

Forwarder = Callable[[Entry], None]
LAZY_BACKLOG = 4096  # non-durable writes waiting: fsync now rather than track more


@dataclass(frozen=True)
class AuditConfig:
    directory: Path
    checkpoint_records: int = 256  # sign the head after this many records...
    checkpoint_seconds: float = 10.0  # ...or this long after the first unsigned one
    segment_bytes: int = 8 << 20  # start a new segment once the current one is this large
    group_commit: bool = True  # concurrent appends share an fsync
    flush_seconds: float = 0.05  # how soon a non-durable append is fsynced anyway

    def __post_init__(self) -> None:
        if self.checkpoint_records < 1:
            raise AuditConfigError("checkpoint_records must be at least 1")
        if not 0 < self.checkpoint_seconds <= 86400:
            raise AuditConfigError("checkpoint_seconds must be in (0, 86400]")
        if self.segment_bytes < 4096:
            raise AuditConfigError("segment_bytes must be at least 4096")
        if not 0 < self.flush_seconds <= 60:
            raise AuditConfigError("flush_seconds must be in (0, 60]")


@dataclass(frozen=True)
class Receipt:
    """What an append wrote: ``durable`` means fsynced before the call returned."""

    seq: int
    hash: str
    segment: str
    durable: bool


@dataclass(frozen=True)
class Recovery:
    """What opening an existing log found."""

    unclean: bool  # the previous writer did not close the log
    discarded_bytes: int  # an incomplete last line cut off (never acknowledged)
    discarded_sha256: str | None


class AuditLog:
    """The one writer of an audit log directory (an exclusive lock enforces it)."""

    def __init__(self, config: AuditConfig, key: AuditSigningKey, *,
                 forwarder: Forwarder | None = None) -> None:
        self.config = config
        self.directory = config.directory
        self._key = key
        self._forwarder = forwarder
        self._lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._written = 0  # bytes written since open, all segments
        self._durable = 0  # bytes fsynced since open
        self._syncing = False  # a leader is fsyncing (set and cleared under _cond)
        # Segment fds closed (rotation, close) while a leader may still be fsyncing them:
        # the leader fsyncs self._fd itself (no dup per fsync) and closes these after.
        self._retired: list[int] = []
        self._failed: str | None = None
        self._closed = False
        self._to_forward: deque[tuple[int, Entry]] = deque()
        # (end, time) of non-durable writes not yet known durable: the background fsyncs
        # them once the oldest is a quarter of flush_seconds old, not at once, so that the
        # durable record that usually follows within milliseconds (a request's own) covers
        # them and does not queue behind a background fsync.
        self._lazy: deque[tuple[int, float]] = deque()
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        self._stop = threading.Event()
        self._head: Entry | _Head = _Head(seq=-1, hash=GENESIS_PREV)
        self._fd = -1
        self._segment = Segment(self.directory / segment_name(0), 0)
        self._segment_name = self._segment.name
        self._segment_size = 0
        self._log_id = ""
        ensure_log_dir(self.directory)
        self._lock_fd = _lock_directory(self.directory)
        try:
            self.recovery = self._open_segments()
            self._write_public_key()
            self.append("audit.opened", {
                "pid": os.getpid(),
                "unclean": self.recovery.unclean,
                "discarded_bytes": self.recovery.discarded_bytes,
                "discarded_sha256": self.recovery.discarded_sha256,
            })
        except BaseException:
            if self._fd >= 0:
                os.close(self._fd)
            os.close(self._lock_fd)
            raise
        self._thread = threading.Thread(target=self._background, name="audit-log", daemon=True)
        self._thread.start()

    # -- public API -----------------------------------------------------------------------

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def failed(self) -> str | None:
        """Why the log stopped taking records, or None while it works (for health checks:
        a daemon can refuse actions up front instead of failing their answers)."""
        return self._failed

    @property
    def unavailable(self) -> str | None:
        """Why an append would fail now (closed or failed), or None while it works."""
        if self._closed:
            return "the audit log is closed"
        if self._failed is not None:
            return f"the audit log stopped taking records after a failure ({self._failed})"
        return None

    @property
    def head(self) -> tuple[int, str]:
        with self._lock:
            return self._head.seq, self._head.hash

    def append(self, kind: str, data: Mapping[str, Any], *, durable: bool = True) -> Receipt:
        """Write one record; with ``durable`` (the default) return only once it is fsynced.

        ``durable=False`` returns once the line is written (it survives the process being
        killed) and fsyncs within ``flush_seconds`` (until then a power loss may lose it).
        """
        check_kind(kind)
        payload = dict(data)
        check_depth(payload)
        data_json = canonical_text(payload)  # outside the lock: no chain state needed
        with self._lock:
            self._check_open()
            entry = self._write_record(kind, data_json, payload)
            segment = self._segment_name
            self._since_checkpoint += 1
            if self._since_checkpoint >= self.config.checkpoint_records:
                self._write_checkpoint("count")
            if self._segment_size >= self.config.segment_bytes:
                self._rotate()
            target = self._written
            if not durable:
                self._lazy.append((target, time.monotonic()))
            if durable and not self.config.group_commit:
                self._sync_locked()
        if durable:
            self._wait_durable(target)
        return Receipt(entry.seq, entry.hash, segment, durable)

    async def append_async(self, kind: str, data: Mapping[str, Any], *,
                           durable: bool = True) -> Receipt:
        """``append`` from a thread, for event loops (the fsync must not block the loop)."""
        return await asyncio.to_thread(self.append, kind, data, durable=durable)

    def checkpoint(self, reason: str = "manual") -> Receipt:
        """Sign the current head now and wait until the checkpoint is durable."""
        with self._lock:
            self._check_open()
            entry = self._write_checkpoint(reason)
            segment = self._segment_name
            target = self._written
        self._wait_durable(target)
        return Receipt(entry.seq, entry.hash, segment, True)

    def sync(self) -> None:
        """Make everything written so far durable."""
        with self._lock:
            self._check_open()
            target = self._written
        self._wait_durable(target)

    def close(self) -> None:
        """Seal the log with a closing checkpoint, fsync, and release the directory."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._closed:
                return
            try:
                if self._failed is None:
                    self._write_checkpoint("close")
                    self._sync_locked()
            finally:
                self._closed = True
                self._retire(self._fd)
                os.close(self._lock_fd)
                with self._cond:
                    self._cond.notify_all()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- writing (callers hold self._lock) ------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise AuditUnavailableError("the audit log is closed")
        if self._failed is not None:
            raise AuditUnavailableError(
                f"the audit log stopped taking records after a failure ({self._failed})")

    def _write(self, fields: dict[str, Any], *, sign: bool = False) -> Entry:
        """Write a genesis entry or a checkpoint."""
        full: dict[str, Any] = {"v": FORMAT_VERSION, "seq": self._head.seq + 1,
                                "ts": timestamp_ns(time.time_ns()), "prev": self._head.hash,
                                **fields}
        if sign:
            message = SIGNATURE_CONTEXT + canonical(full)
            full["sig"] = base64.b64encode(self._key.sign(message)).decode("ascii")
        entry = encode(full, check=False)
        self._emit(entry.line, entry, entry)
        return entry

    def _write_record(self, kind: str, data_json: str, data: dict[str, Any]) -> _Head:
        """Write a record (``data_json`` is ``canonical_text(data)``): the line is assembled
        around the encoded data, and an Entry is built only for a forwarder."""
        seq, prev = self._head.seq + 1, self._head.hash
        ts = timestamp_ns(time.time_ns())
        line = record_line(seq, ts, prev, kind, data_json)
        if len(line) > MAX_ENTRY_BYTES:
            raise AuditRecordError(
                f"entry of {len(line)} bytes exceeds the {MAX_ENTRY_BYTES}-byte limit")
        head = _Head(seq, sha256_hex(line))
        forward = None
        if self._forwarder is not None:
            forward = Entry(line, {"v": FORMAT_VERSION, "seq": seq, "ts": ts, "prev": prev,
                                   "type": EntryType.RECORD.value, "kind": kind, "data": data})
        self._emit(line, head, forward)
        return head

    def _emit(self, line: bytes, head: Entry | _Head, forward: Entry | None) -> None:
        """Append one line to the current segment; ``head`` becomes the chain's head."""
        data = line + b"\n"
        try:
            n = os.write(self._fd, data)
            if n != len(data):
                raise OSError(f"short write ({n} of {len(data)} bytes)")
        except OSError as exc:
            try:  # leave no partial line behind
                os.ftruncate(self._fd, self._segment_size)
            except OSError:
                pass
            self._fail(f"writing {self._segment_name} failed: {exc}")
            raise AuditUnavailableError(f"the audit log cannot write: {exc}") from exc
        self._segment_size += n
        self._written += n
        self._head = head
        if forward is not None:
            with self._cond:
                self._to_forward.append((self._written, forward))

    def _write_checkpoint(self, reason: str) -> Entry:
        entry = self._write({"type": EntryType.CHECKPOINT.value, "log": self._log_id,
                             "key": self._key.key_id, "reason": reason}, sign=True)
        self._since_checkpoint = 0
        self._last_checkpoint = time.monotonic()
        return entry

    def _rotate(self) -> None:
        if self._head.type is not EntryType.CHECKPOINT:
            self._write_checkpoint("rotate")
        self._sync_locked()
        self._retire(self._fd)
        path = self.directory / segment_name(self._head.seq + 1)
        try:
            self._fd = open_segment_for_append(path, create=True)
            fsync_dir(self.directory)
        except OSError as exc:
            self._fd = os.open(os.devnull, os.O_WRONLY)  # keep close() simple
            self._fail(f"starting segment {path.name} failed: {exc}")
            raise AuditUnavailableError(f"the audit log cannot start a new segment: {exc}") \
                from exc
        self._segment = Segment(path, self._head.seq + 1)
        self._segment_name = self._segment.name
        self._segment_size = 0

    def _sync_locked(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self._fail(f"fsync failed: {exc}")
            raise AuditUnavailableError(f"the audit log cannot fsync: {exc}") from exc
        self._publish_durable(self._written)

    # -- durability -----------------------------------------------------------------------

    def _wait_durable(self, target: int) -> None:
        while True:
            with self._cond:
                while True:
                    if self._durable >= target:
                        return
                    if self._failed is not None:
                        raise AuditUnavailableError(
                            f"the audit log failed before this record was durable "
                            f"({self._failed})")
                    if self._closed:
                        raise AuditUnavailableError("the audit log was closed")
                    if not self._syncing:
                        self._syncing = True
                        break
                    self._cond.wait()
            self._lead_sync()

    def _lead_sync(self) -> None:
        try:
            with self._lock:
                if self._closed or self._failed is not None:
                    return
                upto = self._written
                fd = self._fd  # stays open until this sync ends (_retire)
            try:
                os.fsync(fd)
            except OSError as exc:
                self._fail(f"fsync failed: {exc}")
                return
            self._publish_durable(upto)
        finally:
            with self._cond:
                self._syncing = False
                retired, self._retired = self._retired, []
                self._cond.notify_all()
            for old in retired:
                os.close(old)

    def _retire(self, fd: int) -> None:
        """Close a segment fd the writer is done with (rotation, close; self._lock held),
        or leave it to the leader whose fsync may be using it: a leader reads self._fd
        under self._lock after setting _syncing, so with no sync in flight nobody holds
        it. (The old segment was fsynced before: whatever that leader's fsync covers of
        it is already durable.)"""
        with self._cond:
            if self._syncing:
                self._retired.append(fd)
                return
        os.close(fd)

    def _publish_durable(self, upto: int) -> None:
        ready: list[Entry] = []
        with self._cond:
            if upto > self._durable:
                self._durable = upto
            while self._to_forward and self._to_forward[0][0] <= self._durable:
                ready.append(self._to_forward.popleft()[1])
            self._cond.notify_all()
        if self._forwarder is not None:
            for entry in ready:
                try:
                    self._forwarder(entry)
                except Exception:  # forwarding is best effort; the local log is the record
                    log.exception("audit forwarder failed")

    def _fail(self, reason: str) -> None:
        log.error("audit log failed: %s", reason)
        with self._cond:
            if self._failed is None:
                self._failed = reason
            self._cond.notify_all()

    def _background(self) -> None:
        """Time-based checkpoints, and fsync of non-durable appends: a tick every quarter
        of flush_seconds; appends are fsynced once the oldest not yet durable is a quarter
        of flush_seconds old, so within flush_seconds (at most about three quarters)."""
        tick = min(self.config.flush_seconds, self.config.checkpoint_seconds) / 4
        while not self._stop.wait(tick):
            try:
                with self._lock:
                    if self._closed or self._failed is not None:
                        return
                    now = time.monotonic()
                    checkpoint = bool(self._since_checkpoint) and (
                        now - self._last_checkpoint >= self.config.checkpoint_seconds)
                    if checkpoint:
                        self._write_checkpoint("time")
                    with self._cond:
                        durable = self._durable
                    while self._lazy and self._lazy[0][0] <= durable:
                        self._lazy.popleft()
                    due = bool(self._lazy) and (now - self._lazy[0][1] >= tick
                                                or len(self._lazy) >= LAZY_BACKLOG)
                    if not (checkpoint or due):
                        continue
                    target = self._written
                self._wait_durable(target)
            except AuditError as exc:
                log.error("audit background work stopped: %s", exc)
                return

    # -- opening --------------------------------------------------------------------------

    def _open_segments(self) -> Recovery:
        segments, _ = list_segments(self.directory)
        for seg in segments:
            check_writable_only_by_us(seg.path)
        if not segments:
            self._create()
            return Recovery(False, 0, None)
        return self._recover(segments)

    def _create(self) -> None:
        path = self.directory / segment_name(0)
        self._fd = open_segment_for_append(path, create=True)
        fsync_dir(self.directory)
        self._segment = Segment(path, 0)
        self._segment_name = self._segment.name
        self._segment_size = 0
        self._log_id = secrets.token_hex(16)
        self._head = _Head(seq=-1, hash=GENESIS_PREV)  # genesis: seq 0, all-zero prev
        with self._lock:
            self._write({
                "type": EntryType.GENESIS.value, "log": self._log_id, "key": self._key.key_id,
                "pub": base64.b64encode(public_raw(self._key.public_key)).decode("ascii"),
            })
            self._write_checkpoint("genesis")
            self._sync_locked()

    def _recover(self, segments: list[Segment]) -> Recovery:
        first = segments[0]
        genesis = _first_entry(first)
        if genesis is None or genesis.type is not EntryType.GENESIS:
            raise AuditCorruptError(
                f"the audit log in {self.directory} does not start with its genesis entry; "
                "run `isovisor audit verify`")
        if genesis.fields["key"] != self._key.key_id:
            raise AuditCorruptError(
                f"the audit log in {self.directory} belongs to key {genesis.fields['key']}, "
                f"not to this host's audit key {self._key.key_id}")
        self._log_id = str(genesis.fields["log"])
        last = segments[-1]
        after: Seen | None = None
        if last.first_seq != 0:
            after = self._seed(segments)
        result = walk(iter_lines(last), self._key.public_key, after=after, log_id=self._log_id)
        if result.bad is not None:
            raise AuditCorruptError(
                f"the audit log is damaged at {result.bad.location}: {result.bad.message}; "
                "run `isovisor audit verify` and move the damaged log aside")
        head = result.last or after
        if head is None:
            raise AuditCorruptError(f"the audit log's first segment {last.name} is empty")
        discarded, digest = 0, None
        self._fd = fd = open_segment_for_append(last.path, create=False)
        if result.partial is not None:  # a torn write: never acknowledged, cut it off
            discarded = len(result.partial.data)
            digest = sha256_hex(result.partial.data)
            os.ftruncate(fd, result.partial.offset)
            os.fsync(fd)
            log.warning("audit log: discarded %d bytes of an incomplete entry in %s",
                        discarded, last.name)
        self._segment = last
        self._segment_name = last.name
        self._segment_size = os.fstat(fd).st_size
        self._head = head.entry
        unclean = not (head.entry.type is EntryType.CHECKPOINT
                       and head.entry.fields["reason"] == "close")
        return Recovery(unclean, discarded, digest)

    def _seed(self, segments: list[Segment]) -> Seen:
        """The entry before the last segment: the last line of the segment before it."""
        last = segments[-1]
        if len(segments) < 2:
            raise AuditCorruptError(
                f"the audit log starts at seq {last.first_seq}: earlier segments are missing")
        prev = segments[-2]
        line = last_complete_line(prev.path)
        try:
            entry = decode(line) if line is not None else None
        except EntryFormatError as exc:
            raise AuditCorruptError(f"the last entry of {prev.name} is damaged: {exc}") from None
        if entry is None or entry.seq != last.first_seq - 1:
            raise AuditCorruptError(
                f"segment {prev.name} does not end just before {last.name} starts")
        return Seen(Location(prev.name, 0, entry.seq), entry)

    def _write_public_key(self) -> None:
        path = self.directory / PUBLIC_KEY_NAME
        pem = self._key.public_pem()
        try:
            if path.read_bytes() == pem:
                return
        except FileNotFoundError:
            pass
        write_file(path, pem, PUBLIC_MODE, replace=True)


class _Head(NamedTuple):
    """The chain's head when it is a record (what the writer needs of it: no Entry is
    built per append), or 'the entry before genesis' while the genesis entry is written."""

    seq: int
    hash: str
    type: EntryType = EntryType.RECORD


def _first_entry(segment: Segment) -> Entry | None:
    for raw in iter_lines(segment):
        if not raw.complete:
            return None
        try:
            return decode(raw.data)
        except EntryFormatError:
            return None
    return None


def _lock_directory(directory: Path) -> int:
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditBusyError(f"another process is writing the audit log in {directory}") \
            from None
    return fd
