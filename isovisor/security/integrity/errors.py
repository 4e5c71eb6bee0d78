"""Errors of the integrity checks. Each names what failed: the file, the measurement, the
PCR or the check, so a refused launch says why in one sentence."""

from __future__ import annotations


class IntegrityError(Exception):
    """Base: an integrity check failed or could not be made."""


class SignatureError(IntegrityError):
    """A signed document (manifest, policy) does not verify against its pinned key."""


class ManifestError(IntegrityError):
    """The code on disk differs from the signed manifest; `path` names the file."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class PolicyError(IntegrityError):
    """The policy file is unreadable, malformed or not signed by the policy key."""


class EventLogError(IntegrityError):
    """The event log is unreadable or malformed."""


class AttestationError(IntegrityError):
    """A quote bundle failed offline verification; the message names the check."""
