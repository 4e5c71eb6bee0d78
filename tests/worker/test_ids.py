"""uid/gid leases: distinct, safe under concurrent launchers, stale leases reclaimed."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from isovisor.worker.errors import JailError
from isovisor.worker.ids import IdAllocator


def _alloc(args: tuple[str, int]) -> list[int]:
    d, n = args
    alloc = IdAllocator(Path(d), start=0x6100_0000, size=256)
    return [alloc.allocate().uid for _ in range(n)]


def test_leases_are_distinct_and_released(tmp_path: Path) -> None:
    alloc = IdAllocator(tmp_path / "ids", start=0x6100_0000, size=4)
    leases = [alloc.allocate() for _ in range(4)]
    assert len({lease.uid for lease in leases}) == 4
    assert all(lease.uid == lease.gid for lease in leases)
    with pytest.raises(JailError, match="in use"):
        alloc.allocate()
    leases[1].release()
    assert alloc.allocate().uid == leases[1].uid


def test_concurrent_launchers_never_share_an_id(tmp_path: Path) -> None:
    d = str(tmp_path / "ids")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        results = pool.map(_alloc, [(d, 10)] * 4)
    # the pool's workers have exited: their leases are stale now, but while they held
    # them no two were equal
    flat = [u for r in results for u in r]
    assert len(flat) == len(set(flat)) == 40


def test_stale_lease_is_taken_over(tmp_path: Path) -> None:
    alloc = IdAllocator(tmp_path / "ids", start=0x6100_0000, size=1)
    (tmp_path / "ids").mkdir(mode=0o700)
    (tmp_path / "ids" / str(0x6100_0000)).write_text("999999999 0\n")  # no such process
    assert alloc.allocate().uid == 0x6100_0000


def test_lease_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "ids"
    d.mkdir()
    os.chmod(d, 0o777)
    with pytest.raises(JailError, match="writable by others"):
        IdAllocator(d).allocate()
