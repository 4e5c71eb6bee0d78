"""Segment files: naming, listing, reading lines, and the directory's permissions.

A log is a directory of ``audit-<first seq, 12 digits>.log`` files, each a run of entry
lines; the writer appends to the last one only and starts a new one after sealing the
current one with a checkpoint. Only the daemon's user may write the directory and files.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from isovisor.security.audit.entry import MAX_ENTRY_BYTES
from isovisor.security.audit.errors import AuditError, AuditPermissionError

SEGMENT_PREFIX = "audit-"
SEGMENT_SUFFIX = ".log"
_SEGMENT = re.compile(r"^audit-(\d{12})\.log$")
DIR_MODE = 0o750  # the daemon writes; an auditors' group may read
SEGMENT_MODE = 0o640
LOCK_NAME = "audit.lock"
PUBLIC_KEY_NAME = "audit.pub"


@dataclass(frozen=True)
class Segment:
    path: Path
    first_seq: int

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class RawLine:
    """One line of a segment: ``complete`` is False for bytes after the last newline."""

    segment: Segment
    number: int  # 1-based line number within the segment
    offset: int  # byte offset of the line in the segment
    data: bytes  # without the newline
    complete: bool


def segment_name(first_seq: int) -> str:
    return f"{SEGMENT_PREFIX}{first_seq:012d}{SEGMENT_SUFFIX}"


def list_segments(directory: Path) -> tuple[list[Segment], list[str]]:
    """Segments in order, and the names of other ``audit-*`` files (reported, not read)."""
    segments: list[Segment] = []
    strays: list[str] = []
    for name in os.listdir(directory):
        m = _SEGMENT.match(name)
        if m:
            segments.append(Segment(directory / name, int(m.group(1))))
        elif name.startswith(SEGMENT_PREFIX):
            strays.append(name)
    segments.sort(key=lambda s: s.first_seq)
    return segments, sorted(strays)


def log_segments(path: Path) -> list[Segment]:
    """The segments of a log directory, or a single exported file as one segment."""
    if path.is_file():
        return [Segment(path, 0)]
    if not path.is_dir():
        raise AuditError(f"no audit log at {path}")
    segments, _ = list_segments(path)
    if not segments:
        raise AuditError(f"no audit segments (audit-*.log) in {path}")
    return segments


def iter_lines(segment: Segment) -> Iterator[RawLine]:
    """Every line of a segment; an over-long line is returned cut (it cannot decode)."""
    with open(segment.path, "rb", buffering=1 << 16) as f:
        number = 0
        offset = 0
        while True:
            data = f.readline(MAX_ENTRY_BYTES + 2)
            if not data:
                return
            number += 1
            complete = data.endswith(b"\n")
            if not complete and len(data) > MAX_ENTRY_BYTES:
                # Too long to be an entry: skip to the end of this line, keep the head.
                rest = len(data)
                while True:
                    more = f.readline(1 << 16)
                    rest += len(more)
                    if not more or more.endswith(b"\n"):
                        complete = more.endswith(b"\n")
                        break
                yield RawLine(segment, number, offset, data, complete)
                offset += rest
                continue
            yield RawLine(segment, number, offset, data[:-1] if complete else data, complete)
            offset += len(data)


def last_complete_line(path: Path) -> bytes | None:
    """The last newline-terminated line of a file (without its newline), read from the end."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        # Ignore a partial tail: find the last newline first.
        window = min(size, MAX_ENTRY_BYTES + 2)
        f.seek(size - window)
        tail = f.read(window)
        last_nl = tail.rfind(b"\n")
        if last_nl < 0:
            return None
        end = size - window + last_nl
        window = min(end, MAX_ENTRY_BYTES + 1)
        f.seek(end - window)
        chunk = f.read(window)
        start = chunk.rfind(b"\n") + 1
        return chunk[start:]


def ensure_log_dir(directory: Path) -> None:
    """Create the log directory (mode 0750) or check an existing one."""
    if not directory.exists():
        directory.mkdir(mode=DIR_MODE, parents=True)
        os.chmod(directory, DIR_MODE)
    check_writable_only_by_us(directory)


def check_writable_only_by_us(path: Path) -> None:
    """Only the daemon's user may write: owned by us, no group or other write bit."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise AuditPermissionError(f"cannot examine {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise AuditPermissionError(f"{path} is a symbolic link; the audit log refuses links")
    if st.st_uid != os.geteuid():
        raise AuditPermissionError(
            f"{path} is owned by uid {st.st_uid}, not by the daemon's user (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        raise AuditPermissionError(
            f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others can write it")


def open_segment_for_append(path: Path, *, create: bool) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, SEGMENT_MODE)
    try:
        if create:
            os.fchmod(fd, SEGMENT_MODE)
        else:
            check_writable_only_by_us(path)
    except BaseException:
        os.close(fd)
        raise
    return fd
