"""Finding F-003: a malformed lease file is stale, never a crash of id allocation."""

from __future__ import annotations

from pathlib import Path

import pytest

from isovisor.worker.ids import IdAllocator


@pytest.mark.parametrize("content", [b"\xc6\x00", "\u00b2 123\n".encode(), b"", b"abc def"])
def test_malformed_lease_is_stale(tmp_path: Path, content: bytes) -> None:
    lease_dir = tmp_path / "ids"
    lease_dir.mkdir(mode=0o700)
    (lease_dir / str(0x6000_0000)).write_bytes(content)
    lease = IdAllocator(lease_dir, 0x6000_0000, 1).allocate()
    assert lease.uid == 0x6000_0000
    lease.release()
