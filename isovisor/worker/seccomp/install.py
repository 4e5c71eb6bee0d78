"""Install a compiled BPF program on the calling thread with seccomp(2)."""

from __future__ import annotations

import ctypes
import os

from isovisor.worker import libc
from isovisor.worker.errors import JailError

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
BPF_MAXINSNS = 4096


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install(program: bytes, *, all_threads: bool = False, step: str = "seccomp") -> None:
    """Load `program` (struct sock_filter[]) for this thread, or with TSYNC for every
    thread of the process. no_new_privs must already be set."""
    count = len(program) // 8
    if count == 0 or count > BPF_MAXINSNS or len(program) % 8:
        raise JailError(step, f"BPF program of {len(program)} bytes is not loadable")
    buf = ctypes.create_string_buffer(program, len(program))
    # SAFETY: `buf` holds `count` sock_filter entries and outlives the call; the kernel
    # copies the program before seccomp() returns.
    prog = _SockFprog(count, ctypes.cast(buf, ctypes.c_void_p))
    flags = SECCOMP_FILTER_FLAG_TSYNC if all_threads else 0
    try:
        ret = libc.syscall(libc.SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, flags,
                           ctypes.c_void_p(ctypes.addressof(prog)), what="seccomp")
    except OSError as exc:
        raise JailError(step, f"seccomp(SET_MODE_FILTER): {os.strerror(exc.errno or 0)}") \
            from None
    if all_threads and ret != 0:
        raise JailError(step, f"thread {ret} could not be synchronised")
