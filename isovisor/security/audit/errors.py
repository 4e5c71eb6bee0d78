"""One flat exception tree for the audit package; each message is one sentence."""

from __future__ import annotations


class AuditError(Exception):
    """Base of every audit failure."""


class AuditConfigError(AuditError):
    """A setting is out of range."""


class AuditKeyError(AuditError):
    """The audit key is missing, unreadable, malformed or too widely accessible."""


class AuditPermissionError(AuditError):
    """The audit directory or a file in it is owned by someone else or writable by others."""


class AuditBusyError(AuditError):
    """Another process already writes this audit log."""


class AuditCorruptError(AuditError):
    """The log on disk is damaged or altered, so the writer refuses to append to it."""


class AuditRecordError(AuditError):
    """A record cannot be written as given (bad kind, not JSON, too large)."""


class AuditUnavailableError(AuditError):
    """The log cannot take records (closed, or a write or fsync failed): fail closed."""


class EntryFormatError(AuditError):
    """A line of a segment is not a well-formed audit entry."""
