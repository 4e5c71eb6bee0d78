"""The audit log's reader: entry lines (decode), segment files as `isovisor audit
verify` and GET /v1/audit read them. Oracle: only AuditError for malformed input."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fuzz.data import Data
from isovisor.security.audit.entry import decode
from isovisor.security.audit.errors import AuditError

COVERS = ("host:state/audit",)
_state: dict[str, Any] = {}


def one_input(data: bytes) -> None:
    if not _state:
        _state["tmp"] = tempfile.TemporaryDirectory(prefix="isovisor-fuzz-audit-")
    from isovisor.security.audit.export import read_page

    d = Data(data)
    if d.u8() & 1:
        try:
            entry = decode(d.rest())
        except AuditError:
            return
        assert entry.seq >= 0
        return
    directory = Path(_state["tmp"].name)
    for old in directory.glob("audit-*.log"):
        old.unlink()
    (directory / "audit-000000000000.log").write_bytes(d.rest())
    try:
        read_page(directory, -1, 50, None)
    except AuditError:
        pass
