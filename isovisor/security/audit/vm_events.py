"""The daemon's end of the per-VM security events channel (event_channel.py).

`VmEventWatcher` polls the channel of every running VM (every `interval` seconds) and
records each event in the audit log as `security.<kind>` with the VM's scope, id and
tenant (`recorders.record_vm_security_event`). A line that is not a valid event becomes
a `security.malformed-event` record (its hash, length and an escaped prefix, never
trusted); a channel past its size limit one `security.event-channel-overflow`. Each VM
gets `SECURITY_EVENTS_PER_SECOND` records (burst twice that); what is suppressed is
counted in the next record kept. Nothing here raises into the daemon: a failure is
logged and counted.

Where it has read to is kept beside the channel (RUN_DIR/events.offset, written after
the records are appended), so a daemon restart neither loses nor repeats events, except
those of a batch whose offset was not yet saved when the daemon was killed (then they
are recorded twice).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from isovisor.security.audit.errors import AuditError
from isovisor.security.audit.event_channel import (
    ChannelEvent,
    ChannelItem,
    ChannelOverflow,
    ChannelReader,
    MalformedLine,
)
from isovisor.security.audit.recorders import (
    SECURITY_CHANNEL_OVERFLOW,
    SECURITY_EVENTS_PER_SECOND,
    SECURITY_MALFORMED_EVENT,
    AuditSink,
    record_vm_security_event,
)

log = logging.getLogger("isovisor.security.audit")

OFFSET_FILE = "events.offset"
POLL_SECONDS = 0.25
MAX_CHUNKS_PER_POLL = 4  # of event_channel.READ_CHUNK bytes


@dataclass(frozen=True)
class VmChannel:
    """One VM's channel, as the daemon knows it."""

    vm_id: str
    tenant: str
    vm: str
    path: Path  # RUN_DIR/events.jsonl


class _Vm:
    def __init__(self, channel: VmChannel, rate: float, clock: Callable[[], float]) -> None:
        self.channel = channel
        self.reader = ChannelReader(channel.path, *_load_offset(channel.path))
        self.rate = rate
        self.tokens = 2 * rate
        self.last = clock()
        self.suppressed = 0
        self.lock = threading.Lock()

    def allow(self, now: float) -> bool:
        self.tokens = min(2 * self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            self.suppressed += 1
            return False
        self.tokens -= 1
        return True


class VmEventWatcher:
    def __init__(self, sink: AuditSink, channels: Callable[[], Iterable[VmChannel]], *,
                 interval: float = POLL_SECONDS, rate: float = SECURITY_EVENTS_PER_SECOND,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sink = sink
        self._channels = channels
        self._interval = interval
        self._rate = rate
        self._clock = clock
        self._vms: dict[str, _Vm] = {}
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.recorded = 0
        self.failures = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vm-security-events",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def poll(self) -> None:
        """Read every running VM's channel once; forget VMs that are gone (after a last
        read, for what their VMM wrote just before it exited)."""
        current = {c.vm_id: c for c in self._channels()}
        with self._guard:
            gone = [v for vm_id, v in self._vms.items() if vm_id not in current]
        for v in gone:
            self._drain(v, final=True)
            with self._guard:
                self._vms.pop(v.channel.vm_id, None)
        for channel in current.values():
            self._drain(self._get(channel), final=False)

    def drain(self, channel: VmChannel, *, final: bool = True) -> None:
        """Read one VM's channel now (the daemon calls it on every state change of the
        VM, so events written just before its VMM exited are in before it moves on)."""
        self._drain(self._get(channel), final=final)

    def _get(self, channel: VmChannel) -> _Vm:
        with self._guard:
            v = self._vms.get(channel.vm_id)
            if v is None or v.channel.path != channel.path:
                v = self._vms[channel.vm_id] = _Vm(channel, self._rate, self._clock)
            return v

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.poll()
            except Exception:  # never let the watcher die: the next poll tries again
                self.failures += 1
                log.exception("security events watcher: poll failed")

    def _drain(self, v: _Vm, *, final: bool) -> None:
        with v.lock:
            try:
                # A poll reads a few chunks; a final read (the VMM has exited) reads to
                # the end, which MAX_CHANNEL_BYTES bounds.
                for _ in range(MAX_CHUNKS_PER_POLL if not final else 1 << 30):
                    start = v.reader.offset
                    items = v.reader.read(final=final)
                    for item in items:
                        self._record(v, item)
                    if v.reader.offset != start:
                        _save_offset(v.channel.path, v.reader.inode, v.reader.offset)
                    if not items or v.reader.offset == start:
                        return
            except (AuditError, OSError) as exc:
                self.failures += 1
                log.error("security events of VM %s not recorded: %s", v.channel.vm_id, exc)

    def _record(self, v: _Vm, item: ChannelItem) -> None:
        if not v.allow(self._clock()):
            return
        suppressed, v.suppressed = v.suppressed, 0
        note = (f" ({suppressed} earlier events from this VM were not recorded: rate limit)"
                if suppressed else "")
        c = v.channel
        if isinstance(item, ChannelEvent):
            kind, source, detail, when = item.kind, item.source, item.detail, item.time
            offset = None
        elif isinstance(item, MalformedLine):
            kind, source, when, offset = SECURITY_MALFORMED_EVENT, "vmm", None, item.offset
            detail = (f"line at offset {item.offset} of the VMM's security events channel "
                      f"is not a valid event: {item.reason}; {item.length} bytes, sha256 "
                      f"{item.sha256}, starting {item.prefix!r}")
        else:
            assert isinstance(item, ChannelOverflow)
            kind, source, when, offset = SECURITY_CHANNEL_OVERFLOW, "vmm", None, item.offset
            detail = (f"the VMM's security events channel is over its limit at offset "
                      f"{item.offset}; nothing more is read from it")
        record_vm_security_event(self._sink, kind=kind, source=f"vmm: {source}",
                                 detail=detail + note, tenant=c.tenant, vm=c.vm,
                                 vm_id=c.vm_id, when=when, channel_offset=offset,
                                 durable=False)
        self.recorded += 1


def _offset_path(channel: Path) -> Path:
    return channel.with_name(OFFSET_FILE)


def _load_offset(channel: Path) -> tuple[int, int | None]:
    """The saved position, or the start; the file is in the VM's run directory, so it is
    read like the channel: no links, no FIFOs, a few bytes at most."""
    try:
        fd = os.open(_offset_path(channel), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_CLOEXEC)
    except OSError:
        return 0, None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return 0, None
        doc = json.loads(os.read(fd, 256))
        offset, inode = doc["offset"], doc["inode"]
        if isinstance(offset, int) and isinstance(inode, int) and offset >= 0:
            return offset, inode
    except (OSError, ValueError, KeyError, TypeError):
        pass
    finally:
        os.close(fd)
    return 0, None


def _save_offset(channel: Path, inode: int | None, offset: int) -> None:
    path = _offset_path(channel)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # whatever is there (a link, a FIFO) goes; a new file is made
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            os.write(fd, json.dumps({"inode": inode, "offset": offset}).encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:  # the run directory went away (the VM was deleted)
        log.debug("cannot save the security events offset %s: %s", path, exc)
