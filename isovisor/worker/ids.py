"""Per-VM uid/gid from a reserved range, leased safely across concurrent launchers.

A lease is a file `<dir>/<uid>` created with O_EXCL while holding an flock on
`<dir>/.lock`; it records the holder's pid and start time. A lease whose holder no longer
exists (same pid, same start time) is stale and may be taken over. The uid and the gid are
the same number. The range is chosen far above ordinary users and subuid ranges, and it is
checked against /etc/passwd and /etc/group so a worker never runs as a real account.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from isovisor.worker.errors import JailError

# 0x60000000.. : outside the 16-bit legacy range, far above /etc/subuid allocations
# (100000 + 65536*n) and below 2^31, so signed 32-bit tools print them correctly.
ID_RANGE_START = 0x6000_0000
ID_RANGE_SIZE = 65536
DEFAULT_LEASE_DIR = Path("/run/isovisor/ids")


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), or None if no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _system_ids() -> set[int]:
    ids: set[int] = set()
    for path in ("/etc/passwd", "/etc/group"):
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                parts = line.split(":")
                if len(parts) > 2 and parts[2].isdigit():
                    ids.add(int(parts[2]))
    return ids


@dataclass(frozen=True)
class IdLease:
    uid: int
    gid: int
    path: Path

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class IdAllocator:
    def __init__(self, lease_dir: Path = DEFAULT_LEASE_DIR, start: int = ID_RANGE_START,
                 size: int = ID_RANGE_SIZE) -> None:
        self.dir = lease_dir
        self.start = start
        self.size = size

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.dir)
        except OSError as exc:
            raise JailError("uid", f"lease directory {self.dir}: {exc.strerror}") from None
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise JailError("uid", f"lease directory {self.dir} is writable by others")
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _stale(self, path: Path) -> bool:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            return True  # not a lease this code wrote (finding F-003): stale
        pid_text, _, start = text.strip().partition(" ")
        if not (pid_text.isascii() and pid_text.isdigit()):
            return True
        return _start_time(int(pid_text)) != start

    def allocate(self) -> IdLease:
        """Lease the lowest free id in the range (uid == gid)."""
        me = os.getpid()
        record = f"{me} {_start_time(me)}\n"
        taken = _system_ids()
        with self._locked():
            for n in range(self.start, self.start + self.size):
                if n in taken:
                    continue
                path = self.dir / str(n)
                if path.exists():
                    if not self._stale(path):
                        continue
                    path.unlink(missing_ok=True)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o600)
                except FileExistsError:
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(record)
                return IdLease(n, n, path)
        raise JailError("uid", f"all {self.size} worker ids from {self.start} are in use")
