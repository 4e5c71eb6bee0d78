"""Resource limits for a worker: open files, tasks, no core dumps, file size.

RLIMIT_NPROC counts tasks (threads too) per real uid; every worker has its own uid, so the
limit is per VM. RLIMIT_FSIZE bounds what the worker can write to a regular file (its
serial output, when the host points it at a file); SIGXFSZ is ignored so a write past it
fails with EFBIG instead of killing the VM. The kernel applies it to every write at an
offset at or past the limit, so with disks it is at least the largest image (the images
never grow: requests past their end are refused before any I/O).
"""

from __future__ import annotations

import os
import resource
import signal
import stat
from dataclasses import dataclass

from isovisor.devices.virtio.vsock.listener import MAX_HANDSHAKES
from isovisor.devices.virtio.vsock.muxer import MAX_CONNECTIONS
from isovisor.worker.errors import JailError

NOFILE_HEADROOM = 32  # fds opened after setup: pipes and eventfds of device threads
# A vsock device holds up to MAX_CONNECTIONS host sockets and MAX_HANDSHAKES accepted
# clients, plus its epoll and one socket in flight from the broker.
VSOCK_FDS = MAX_CONNECTIONS + MAX_HANDSHAKES + 2


@dataclass(frozen=True)
class Rlimits:
    nofile: int
    nproc: int
    fsize: int
    core: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"nofile": self.nofile, "nproc": self.nproc, "fsize": self.fsize,
                "core": self.core}


def highest_open_fd() -> int:
    return max((int(n) for n in os.listdir("/proc/self/fd")), default=2)


def file_budget(fds: list[int], serial_budget: int) -> int:
    """RLIMIT_FSIZE: room for `serial_budget` more bytes in any regular file among `fds`
    (0 when none of them is a regular file)."""
    limit = 0
    for fd in fds:
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            limit = max(limit, st.st_size + serial_budget)
    return limit


def plan(vcpus: int, tasks_limit: int, output_fds: list[int], serial_budget: int,
         disk_sizes: list[int] | None = None, extra_fds: int = 0) -> Rlimits:
    return Rlimits(nofile=highest_open_fd() + 1 + NOFILE_HEADROOM + extra_fds,
                   nproc=tasks_limit,
                   fsize=max([file_budget(output_fds, serial_budget), *(disk_sizes or [])]))


def apply(limits: Rlimits) -> None:
    try:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        for res, value in ((resource.RLIMIT_NOFILE, limits.nofile),
                           (resource.RLIMIT_NPROC, limits.nproc),
                           (resource.RLIMIT_CORE, limits.core),
                           (resource.RLIMIT_FSIZE, limits.fsize)):
            resource.setrlimit(res, (value, value))
    except (OSError, ValueError) as exc:
        raise JailError("rlimits", str(exc)) from None
