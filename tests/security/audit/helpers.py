"""Helpers for the audit tests: small logs, scratch copies to tamper with, the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from isovisor.security.audit import Anchor, AuditConfig, AuditLog, AuditSigningKey, verify_log
from isovisor.security.audit.segments import segment_name
from isovisor.security.audit.verify import VerifyReport

REPO = Path(__file__).resolve().parents[3]


def write_log(directory: Path, key: AuditSigningKey, records: int, *,
              checkpoint_records: int = 3, segment_bytes: int = 1 << 20) -> Path:
    """A closed log: genesis, checkpoint, audit.opened, ``records`` records, close."""
    cfg = AuditConfig(directory, checkpoint_records=checkpoint_records,
                      segment_bytes=segment_bytes, checkpoint_seconds=3600)
    with AuditLog(cfg, key) as log:
        for i in range(records):
            log.append("api.request", {"principal": f"user{i}", "action": "vms/read",
                                       "scope": f"/tenants/t{i % 2}", "outcome": "allowed"})
    return directory


class Copy:
    """A scratch log directory holding tampered bytes as its only segment."""

    def __init__(self, root: Path, key: AuditSigningKey) -> None:
        self.dir = root / "copy"
        self.dir.mkdir(mode=0o750)
        self.segment = self.dir / segment_name(0)
        self.key = key
        # One descriptor rewritten in place: reopening and truncating a file per mutation
        # costs milliseconds on this disk, and the byte-by-byte tests make thousands.
        self._fd = os.open(self.segment, os.O_WRONLY | os.O_CREAT, 0o640)
        self._size = 0

    def put(self, data: bytes) -> None:
        os.pwrite(self._fd, data, 0)
        if len(data) < self._size:
            os.ftruncate(self._fd, len(data))
        self._size = len(data)

    def verify(self, data: bytes, anchors: list[Anchor] | None = None) -> VerifyReport:
        self.put(data)
        return verify_log(self.dir, self.key.public_key, anchors=anchors or [])

    def close(self) -> None:
        os.close(self._fd)


def lines_of(data: bytes) -> list[bytes]:
    return data.split(b"\n")[:-1]


def line_of_offset(data: bytes, offset: int) -> int:
    """1-based line number holding byte ``offset`` (a newline belongs to its line)."""
    return data.count(b"\n", 0, offset) + 1


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real `isovisor` command line, in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "isovisor.cli.main", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, **(env or {})})


def write_public_key(directory: Path, key: AuditSigningKey) -> Path:
    path = directory / "trusted.pub"
    path.write_bytes(key.public_pem())
    return path
