"""Core scheduling: a cookie for the worker so no other tenant's task shares a physical
core's SMT siblings with it (prctl PR_SCHED_CORE, Linux 5.14+ with CONFIG_SCHED_CORE).

The worker creates a fresh cookie for its whole thread group, so it never shares siblings
with any other VM, the same tenant's included: stricter than per-tenant, and needing no
shared state. Where the kernel lacks core scheduling this is reported, not fatal: the
report says whether SMT is on (if it is off, no siblings exist to share).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from isovisor.worker import libc

PR_SCHED_CORE = 62
PR_SCHED_CORE_CREATE = 1
PIDTYPE_TGID = 1


@dataclass(frozen=True)
class CoreSchedStatus:
    enabled: bool
    detail: str


def smt_state() -> str:
    """'on', 'off', 'notsupported'... from sysfs (read before the jail)."""
    try:
        return Path("/sys/devices/system/cpu/smt/control").read_text().strip()
    except OSError:
        return "unknown"


def create_cookie(smt: str) -> CoreSchedStatus:
    try:
        libc.prctl(PR_SCHED_CORE, PR_SCHED_CORE_CREATE, 0, PIDTYPE_TGID, 0)
    except OSError as exc:
        why = os.strerror(exc.errno or 0)
        return CoreSchedStatus(False, f"core scheduling unavailable (prctl PR_SCHED_CORE: "
                               f"{why}; kernel without CONFIG_SCHED_CORE); SMT is {smt}")
    return CoreSchedStatus(True, f"per-VM core-scheduling cookie set; SMT is {smt}")
