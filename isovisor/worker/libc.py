"""The libc wrappers the jail needs and Python 3.11's `os` lacks (unshare, mount,
pivot_root, prctl, capset, syscall), each raising OSError with the errno."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

# x86_64 system call numbers used directly (no libc wrapper in glibc 2.36).
SYS_PIVOT_ROOT = 155
SYS_SECCOMP = 317
SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_RESTRICT_SELF = 446

_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.sethostname.restype = ctypes.c_int


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    # SAFETY: every pointer is a NUL-terminated bytes object alive for the call, or NULL.
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {target}")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    # SAFETY: two NUL-terminated path strings alive for the call.
    ret = _libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT), ctypes.c_char_p(new_root.encode()),
                        ctypes.c_char_p(put_old.encode()))
    _check(ret, "pivot_root")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, len(raw)), "sethostname")


def syscall(number: int, *args: int | ctypes.c_void_p | None, what: str) -> int:
    """A raw system call with integer or pointer arguments (each passed as a long/pointer)."""
    conv = [a if isinstance(a, ctypes.c_void_p) else ctypes.c_long(a or 0) for a in args]
    return _check(_libc.syscall(ctypes.c_long(number), *conv), what)


def libc() -> ctypes.CDLL:
    return _libc
