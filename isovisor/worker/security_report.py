"""Host-side security reporting for workers: why a worker died, and what its kernel-side
confinement looks like from outside.

A seccomp violation kills the worker with SIGSYS (SECCOMP_RET_KILL_PROCESS). The wait
status says only "SIGSYS"; the syscall is named by the kernel's audit record of the kill
(type=1326, emitted for kill actions listed in /proc/sys/kernel/seccomp/actions_logged,
which is the default), read from /dev/kmsg: "... pid=<host pid> ... sig=31 ...
syscall=<nr> ...". The record carries the pid in the host's PID namespace, which is the
pid the host knows. No ptrace, nothing running inside the worker: a compromised worker
cannot forge or suppress it.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from isovisor.worker.seccomp.compile import syscall_name

KMSG = "/dev/kmsg"
AUDIT_SECCOMP = "type=1326"
# kauditd prints asynchronously: wait this long for the record after the death.
AUDIT_WAIT_S = 2.0
_AUDIT_FIELDS = re.compile(r"\b(pid|sig|syscall|arch|comm|code)=(\"[^\"]*\"|\S+)")


@dataclass(frozen=True)
class SeccompKill:
    pid: int
    syscall: int | None
    name: str
    source: str  # where the syscall number came from

    def describe(self) -> str:
        if self.syscall is None:
            return f"killed by seccomp (SIGSYS): forbidden syscall unknown ({self.source})"
        return f"killed by seccomp: forbidden syscall {self.name} ({self.syscall})"


def _kmsg_records() -> list[str]:
    try:
        fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return []
    records = []
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.EPIPE:  # overwritten while reading: go on
                    continue
                break
            if not rec:
                break
            records.append(rec.decode("utf-8", "replace"))
    finally:
        os.close(fd)
    return records


def audit_syscall(pid: int, wait: float = AUDIT_WAIT_S) -> int | None:
    """The syscall number in the newest seccomp audit record for `pid`, or None."""
    deadline = time.monotonic() + wait
    while True:
        found = None
        for rec in _kmsg_records():
            if AUDIT_SECCOMP not in rec:
                continue
            fields = dict(_AUDIT_FIELDS.findall(rec.partition(";")[2]))
            if fields.get("pid") == str(pid) and fields.get("sig") == str(int(signal.SIGSYS)):
                sc = fields.get("syscall", "")
                if sc.isdigit():
                    found = int(sc)
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(0.05)


def explain_sigsys(pid: int, status: int) -> SeccompKill | None:
    """If `status` is a death by SIGSYS, what the worker tried."""
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS):
        return None
    nr = audit_syscall(pid)
    if nr is None:
        why = ("no audit record in /dev/kmsg: check that kernel.seccomp.actions_logged "
               "lists kill_process and that auditd is not taking the records")
        return SeccompKill(pid, None, "?", why)
    return SeccompKill(pid, nr, syscall_name(nr), "kernel audit record")


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (CapEff, NoNewPrivs, Seccomp, Uid...)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"wait status {status:#x}"
