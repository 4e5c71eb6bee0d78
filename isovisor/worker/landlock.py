"""Landlock: a second, independent layer under seccomp's ban on open().

The worker restricts itself to a domain that handles every filesystem right its kernel
knows and grants none (no path can be opened, created, executed, renamed...), denies TCP
bind/connect (ABI 4+), and is scoped (ABI 6+) so it can neither signal processes outside
its domain nor reach abstract Unix sockets created outside it. Files opened before the
restriction (the VM's fds) keep working. Needs no_new_privs first.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from isovisor.worker import libc
from isovisor.worker.errors import JailError

LANDLOCK_CREATE_RULESET_VERSION = 1
# Filesystem rights by the ABI version that introduced them.
_FS_BITS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_NET_ALL = 0x3  # LANDLOCK_ACCESS_NET_BIND_TCP | CONNECT_TCP (ABI 4)
_SCOPE_ALL = 0x3  # LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET | SIGNAL (ABI 6)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


@dataclass(frozen=True)
class LandlockStatus:
    abi: int  # 0: not available
    detail: str


def abi_version() -> int:
    try:
        return libc.syscall(libc.SYS_LANDLOCK_CREATE_RULESET, None, 0,
                            LANDLOCK_CREATE_RULESET_VERSION, what="landlock_create_ruleset")
    except OSError:
        return 0


def restrict_self() -> LandlockStatus:
    """Deny all filesystem access (and TCP, and out-of-domain signals where the ABI has
    them). Absent Landlock is reported; a failure with Landlock present is fatal."""
    abi = abi_version()
    if abi <= 0:
        return LandlockStatus(0, "Landlock unavailable on this kernel")
    fs = max(v for k, v in _FS_BITS_BY_ABI.items() if k <= abi)
    attr = _RulesetAttr(fs, _NET_ALL if abi >= 4 else 0, _SCOPE_ALL if abi >= 6 else 0)
    size = ctypes.sizeof(_RulesetAttr) if abi >= 6 else 16 if abi >= 4 else 8
    try:
        # SAFETY: attr is a live struct of at least `size` bytes; the kernel copies it.
        fd = libc.syscall(libc.SYS_LANDLOCK_CREATE_RULESET,
                          ctypes.c_void_p(ctypes.addressof(attr)), size, 0,
                          what="landlock_create_ruleset")
        try:
            libc.syscall(libc.SYS_LANDLOCK_RESTRICT_SELF, fd, 0, what="landlock_restrict_self")
        finally:
            os.close(fd)
    except OSError as exc:
        raise JailError("landlock", os.strerror(exc.errno or 0)) from None
    parts = ["all filesystem access denied"]
    if abi >= 4:
        parts.append("TCP bind/connect denied")
    if abi >= 6:
        parts.append("signals and abstract sockets scoped to the worker")
    return LandlockStatus(abi, f"Landlock ABI {abi}: " + ", ".join(parts))
