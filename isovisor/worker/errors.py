"""Errors of the worker package: every jail failure names the step that failed."""

from __future__ import annotations


class WorkerError(Exception):
    """A worker could not be launched or controlled (a clear sentence)."""


class JailError(WorkerError):
    """A jail step failed: the VM does not start (fail closed)."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"jail step '{step}' failed: {detail}")
        self.step = step
        self.detail = detail


class BuildError(WorkerError):
    """The VM itself could not be built (bad kernel, bad size...): the VMM's own sentence."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.step = "build"
        self.detail = detail


class ProtocolError(WorkerError):
    """A malformed or unexpected control message."""
