"""Tamper-evident audit log: hash-chained, signed, fsynced segment files and their verifier.

Write with `AuditLog` (see log.py), verify with `verify_log` (verify.py), read with
`read_entries` (export.py). The format is described in entry.py and docs/AUDIT.md.
"""

from isovisor.security.audit.chain import Anchor, Break, Location
from isovisor.security.audit.entry import Entry, EntryType
from isovisor.security.audit.errors import (
    AuditBusyError,
    AuditConfigError,
    AuditCorruptError,
    AuditError,
    AuditKeyError,
    AuditPermissionError,
    AuditRecordError,
    AuditUnavailableError,
)
from isovisor.security.audit.keys import (
    AuditSigningKey,
    generate_key,
    load_or_generate_key,
    load_public_key,
    load_signing_key,
)
from isovisor.security.audit.log import AuditConfig, AuditLog, Receipt, Recovery
from isovisor.security.audit.verify import Status, VerifyReport, verify_log

__all__ = [
    "Anchor", "AuditBusyError", "AuditConfig", "AuditConfigError", "AuditCorruptError",
    "AuditError", "AuditKeyError", "AuditLog", "AuditPermissionError", "AuditRecordError",
    "AuditSigningKey", "AuditUnavailableError", "Break", "Entry", "EntryType", "Location",
    "Receipt", "Recovery", "Status", "VerifyReport", "generate_key", "load_or_generate_key",
    "load_public_key", "load_signing_key", "verify_log",
]
