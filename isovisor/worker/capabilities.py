"""Credentials: switch to the VM's own uid/gid and drop every capability.

Order matters: the bounding set can only be dropped while CAP_SETPCAP is still held, and
securebits are locked before the uid changes so no later transition can regain root's
capabilities. After setresuid the kernel has already cleared the permitted and effective
sets (the uid left 0); capset() clears them explicitly and capget() verifies it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from isovisor.worker import libc
from isovisor.worker.errors import JailError

PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
# SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP_LOCKED
# | SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE | ..._LOCKED
SECUREBITS = 0x01 | 0x02 | 0x08 | 0x20 | 0x40 | 0x80
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def last_cap() -> int:
    """The highest capability number this kernel knows (read before the jail)."""
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        return 63


def _capget() -> tuple[int, int, int]:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    # SAFETY: version 3 takes a header and an array of two data structs, both live here.
    if libc.libc().capget(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    lo, hi = data[0], data[1]
    return (int(lo.effective) | int(hi.effective) << 32,
            int(lo.permitted) | int(hi.permitted) << 32,
            int(lo.inheritable) | int(hi.inheritable) << 32)


def _capset_zero() -> None:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # all zero
    # SAFETY: as in _capget; the kernel only reads the two data structs.
    if libc.libc().capset(ctypes.byref(hdr), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def drop_privileges(uid: int, gid: int, cap_last: int) -> None:
    """Become uid:gid with no supplementary groups and no capabilities at all."""
    try:
        for cap in range(cap_last + 1):
            libc.prctl(PR_CAPBSET_DROP, cap)
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        libc.prctl(PR_SET_SECUREBITS, SECUREBITS)
    except OSError as exc:
        raise JailError("capabilities", f"dropping the bounding set: "
                        f"{os.strerror(exc.errno or 0)}") from None
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise JailError("credentials", f"switching to uid {uid} gid {gid}: "
                        f"{exc.strerror}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise JailError("credentials", f"still {os.getresuid()}/{os.getresgid()}")
    try:
        _capset_zero()
        eff, perm, inh = _capget()
    except OSError as exc:
        raise JailError("capabilities", f"capset: {os.strerror(exc.errno or 0)}") from None
    if eff or perm or inh:
        raise JailError("capabilities", f"capabilities remain: eff={eff:#x} perm={perm:#x}")
    # Not dumpable: no other process of this uid may ptrace it or read its /proc files.
    libc.prctl(PR_SET_DUMPABLE, 0)


def set_no_new_privs() -> None:
    try:
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
        ok = libc.prctl(PR_GET_NO_NEW_PRIVS) == 1
    except OSError as exc:
        raise JailError("no_new_privs", os.strerror(exc.errno or 0)) from None
    if not ok:
        raise JailError("no_new_privs", "PR_GET_NO_NEW_PRIVS does not read 1")
