"""Errors of the host daemon. Each carries the HTTP status and error code the API answers
with, so the mapping lives in one place."""

from __future__ import annotations


class HostError(Exception):
    status = 500
    code = "InternalError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(HostError):  # noqa: N818 (named after the error code)
    status = 400
    code = "InvalidRequest"


class Unauthenticated(HostError):  # noqa: N818 (named after the error code)
    status = 401
    code = "Unauthenticated"


class Forbidden(HostError):  # noqa: N818 (named after the error code)
    status = 403
    code = "Forbidden"


class NotFound(HostError):  # noqa: N818 (named after the error code)
    status = 404
    code = "NotFound"


class Conflict(HostError):  # noqa: N818 (named after the error code)
    status = 409
    code = "Conflict"


class QuotaExceeded(HostError):  # noqa: N818 (named after the error code)
    status = 409
    code = "QuotaExceeded"


class InvalidState(HostError):  # noqa: N818 (named after the error code)
    """The VM is not in a state that allows the operation (start a running VM, ...)."""

    status = 409
    code = "InvalidState"


class PayloadTooLarge(HostError):  # noqa: N818 (named after the error code)
    status = 413
    code = "PayloadTooLarge"


class AuditUnavailable(HostError):  # noqa: N818 (named after the error code)
    """The audit log cannot record the request, so it is refused before it runs."""

    status = 503
    code = "AuditUnavailable"


class LaunchRefused(HostError):  # noqa: N818 (named after the error code)
    """The launch gate refused: the code, the platform measurements, the PCRs or the
    policy failed a check (isovisor.host.integrity); the message names which."""

    status = 503
    code = "LaunchRefused"


class RunnerError(HostError):
    """Launching or controlling a VM process failed."""

    status = 500
    code = "RunnerError"
