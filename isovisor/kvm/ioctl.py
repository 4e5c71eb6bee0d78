"""The one place that issues ioctl(2) on KVM file descriptors.

Calls go through ctypes' CDLL, which releases the GIL for the duration of the call, so a
vCPU blocked in KVM_RUN never stops other Python threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
from typing import Any

from isovisor.kvm.constants import IOCTL_NAMES
from isovisor.kvm.errors import KvmIoctlError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


# The bare foreign function, for hot paths that check the return value themselves.
raw_ioctl = _ioctl


def ioctl_name(request: int) -> str:
    return IOCTL_NAMES.get(request, f"ioctl {request:#x}")


def ioctl(fd: int, request: int, arg: Any = None, *, retry_eintr: bool = True) -> int:
    """Issue an ioctl; `arg` is an int, None, or a ctypes object passed by reference.

    Raises KvmIoctlError naming the ioctl and errno on failure.
    """
    if arg is None:
        ptr: Any = None
    elif isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        # SAFETY: `arg` is a live ctypes object sized for this request (the request number
        # encodes the size and the struct sizes are asserted in structs.py); the kernel
        # reads/writes only that many bytes, and the object outlives the call.
        ptr = ctypes.byref(arg)
    while True:
        ret: int = _ioctl(fd, request, ptr)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err == _errno.EINTR and retry_eintr:
            continue
        raise KvmIoctlError(ioctl_name(request), err)
