"""SQLite state: migrations, quotas enforced atomically under concurrent creates,
pagination, idempotency keys."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from isovisor.host.db import MIGRATIONS, Database
from isovisor.host.errors import InvalidRequest, QuotaExceeded
from isovisor.host.idempotency import IdempotencyStore
from isovisor.host.images import ImageStore
from isovisor.host.models import Quota
from isovisor.host.tenants import TenantStore
from isovisor.host.vms import VmSpec, VmStore


def test_migrations_set_the_version_and_refuse_a_newer_schema(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    assert db.schema_version == len(MIGRATIONS)
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(RuntimeError, match="newer"):
        Database(tmp_path / "s.db")


def test_reopening_keeps_data(tmp_path: Path) -> None:
    TenantStore(Database(tmp_path / "s.db")).create("a")
    assert TenantStore(Database(tmp_path / "s.db")).get("a").name == "a"


def test_concurrent_creates_race_one_quota(tmp_path: Path) -> None:
    """16 threads, each with its own SQLite connection, create VMs against a quota of 5:
    exactly 5 succeed, and the usage never exceeds the quota."""
    db = Database(tmp_path / "s.db")
    TenantStore(db).create("a", quota=Quota(max_vcpus=64, max_memory_mib=1 << 20, max_vms=5))
    ImageStore(db, tmp_path / "images").put("a", "k", [b"x"])
    vms = VmStore(db)
    barrier = threading.Barrier(16)
    results: list[str] = []
    lock = threading.Lock()

    def create(i: int) -> None:
        barrier.wait()
        try:
            vms.create("a", VmSpec(name=f"v{i}", kernel="k"))
            outcome = "ok"
        except QuotaExceeded:
            outcome = "quota"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 5 and results.count("quota") == 11
    assert TenantStore(db).usage("a").max_vms == 5


def test_quota_counts_vcpus_and_memory(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.db")
    TenantStore(db).create("a", quota=Quota(max_vcpus=3, max_memory_mib=512, max_vms=10))
    ImageStore(db, tmp_path / "images").put("a", "k", [b"x"])
    vms = VmStore(db)
    vms.create("a", VmSpec(name="v1", kernel="k", vcpus=2, memory_mib=256))
    with pytest.raises(QuotaExceeded, match="vCPUs"):
        vms.create("a", VmSpec(name="v2", kernel="k", vcpus=2, memory_mib=64))
    with pytest.raises(QuotaExceeded, match="memory"):
        vms.create("a", VmSpec(name="v3", kernel="k", vcpus=1, memory_mib=512))


def test_pagination_walks_everything_once(tmp_path: Path) -> None:
    tenants = TenantStore(Database(tmp_path / "s.db"))
    for i in range(7):
        tenants.create(f"t{i}")
    seen, token = [], None
    while True:
        page = tenants.page(3, token, lambda t: t.name != "t4")
        seen += [t.name for t in page.items]
        if page.next_token is None:
            break
        token = page.next_token
    assert seen == ["t0", "t1", "t2", "t3", "t5", "t6"]
    with pytest.raises(InvalidRequest):
        tenants.page(3, "garbage!", lambda t: True)


def test_idempotency_replays_and_refuses_another_body(tmp_path: Path) -> None:
    store = IdempotencyStore(Database(tmp_path / "s.db"))
    assert store.claim("alice", "k1", "fp1") is None
    store.complete("alice", "k1", 201, {"id": 1})
    replay = store.claim("alice", "k1", "fp1")
    assert replay is not None and replay.body == {"id": 1}
    with pytest.raises(InvalidRequest):
        store.claim("alice", "k1", "fp2")
    assert store.claim("bob", "k1", "fp1") is None  # keys are per principal


def test_database_file_is_sqlite_wal(tmp_path: Path) -> None:
    Database(tmp_path / "s.db")
    conn = sqlite3.connect(tmp_path / "s.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_migration_from_version_1_keeps_vms(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "s.db")
    conn.executescript(MIGRATIONS[0])
    conn.execute("INSERT INTO tenants VALUES ('a', '', 8, 8192, 10, 'now')")
    conn.execute("INSERT INTO images VALUES ('a', 'k', 1, 'x', 'now')")
    conn.execute("INSERT INTO vms (tenant, name, id, vcpus, memory_mib, kernel, cmdline, "
                 "desired, state, created_at, updated_at) VALUES ('a', 'v', 'id1', 1, 64, "
                 "'k', '', 'stopped', 'stopped', 'now', 'now')")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    db = Database(tmp_path / "s.db")
    assert db.schema_version == len(MIGRATIONS) >= 2
    vm = VmStore(db).get("a", "v")
    assert vm.disks == () and vm.rng is False


def test_state_database_is_private_to_the_daemon(tmp_path: Path) -> None:
    """Finding F-002: tenants, principals and roles are not readable by local users."""
    import stat

    from isovisor.host.db import Database

    db = Database(tmp_path / "isovisord.sqlite3")
    with db.write() as conn:
        conn.execute("PRAGMA user_version")
    for name in ("isovisord.sqlite3", "isovisord.sqlite3-wal", "isovisord.sqlite3-shm"):
        path = tmp_path / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
