"""Errors raised by the KVM bindings."""

from __future__ import annotations

import errno
import os


class KvmError(Exception):
    """Base of every error from the kvm package."""


class KvmUnavailableError(KvmError):
    """/dev/kvm is missing, not accessible, or lacks a capability isovisor needs."""


class KvmIoctlError(KvmError):
    """An ioctl failed; carries the ioctl's name and errno."""

    def __init__(self, ioctl_name: str, err: int, detail: str = "") -> None:
        self.ioctl_name = ioctl_name
        self.errno = err
        name = errno.errorcode.get(err, str(err))
        self.errno_name = name
        msg = f"{ioctl_name} failed: {name} ({os.strerror(err)})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)
