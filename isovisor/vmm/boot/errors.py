"""Errors of the boot loaders.

Every kernel image, command line and initrd is untrusted input: anything malformed, or
anything that would not fit the guest, surfaces as `BootImageError` with a sentence that
names the problem. Nothing else (IndexError, struct.error, GuestMemoryError...) escapes.
"""

from __future__ import annotations


class BootError(Exception):
    """Base of every error raised while loading a guest kernel."""


class BootImageError(BootError):
    """The kernel image, command line or initrd is malformed or does not fit the guest."""


class BootConfigError(BootError):
    """The loader was called with arguments that cannot work (not the image's fault)."""
