"""Worker uid/gid leases: files in a root-owned runtime directory, read back to decide
whether a lease is stale. Whatever a lease file holds, allocation hands out an id in the
range that no live lease holds, creates its lease 0600, or fails with JailError."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from fuzz.data import Data
from isovisor.worker.errors import JailError
from isovisor.worker.ids import IdAllocator

COVERS = ("host:runtime/worker-id-leases",)
START, SIZE = 0x6000_0000, 4
_state: dict[str, Any] = {}


def one_input(data: bytes) -> None:
    if not _state:
        _state["tmp"] = tempfile.TemporaryDirectory(prefix="isovisor-fuzz-ids-")
    d = Data(data)
    lease_dir = Path(_state["tmp"].name) / "ids"
    lease_dir.mkdir(mode=0o700, exist_ok=True)
    for old in lease_dir.iterdir():
        old.unlink()
    live = set()
    for i in range(SIZE):
        if d.flag():
            content = d.blob(64)
            if d.u8() == 1:  # a lease held by this very process: never stale
                content = f"{os.getpid()} {_start()}\n".encode()
                live.add(START + i)
            (lease_dir / str(START + i)).write_bytes(content)
    try:
        lease = IdAllocator(lease_dir, START, SIZE).allocate()
    except JailError as exc:
        assert "in use" in str(exc), exc  # every id held (some content may name a live pid)
        return
    assert START <= lease.uid < START + SIZE and lease.uid == lease.gid
    assert lease.uid not in live, "a live lease was taken over"
    assert stat.S_IMODE(os.stat(lease.path).st_mode) == 0o600
    lease.release()


def _start() -> str | None:
    from isovisor.worker.ids import _start_time

    return _start_time(os.getpid())
