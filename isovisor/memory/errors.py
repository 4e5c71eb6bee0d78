"""Errors of the memory package."""

from __future__ import annotations


class GuestMemoryError(Exception):
    """A guest-physical access outside RAM, straddling a hole, or overflowing."""


class GuestMemoryClosedError(GuestMemoryError):
    """Access after teardown."""
