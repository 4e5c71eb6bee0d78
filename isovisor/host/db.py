"""SQLite state: one file, WAL, foreign keys, numbered schema migrations.

Each thread gets its own connection (the API serves requests from a thread pool). Writes
go through `write()`, a `BEGIN IMMEDIATE` transaction: the write lock is taken up front,
so a check-then-insert (quotas, idempotency keys) cannot interleave with another."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

# Writers queue behind each other for at most this long before failing with "locked".
BUSY_TIMEOUT_MS = 10_000

MIGRATIONS: list[str] = [
    # 1: the first schema
    """
    CREATE TABLE tenants (
        name TEXT PRIMARY KEY,
        description TEXT NOT NULL DEFAULT '',
        max_vcpus INTEGER NOT NULL,
        max_memory_mib INTEGER NOT NULL,
        max_vms INTEGER NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE principals (
        name TEXT PRIMARY KEY,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        last_serial TEXT NOT NULL
    );
    CREATE TABLE role_definitions (
        scope TEXT NOT NULL,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        actions TEXT NOT NULL,
        not_actions TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (scope, name)
    );
    CREATE TABLE role_assignments (
        id TEXT PRIMARY KEY,
        principal TEXT NOT NULL,
        role TEXT NOT NULL,
        role_scope TEXT,
        scope TEXT NOT NULL,
        tenant TEXT REFERENCES tenants(name) ON DELETE CASCADE,
        created_at TEXT NOT NULL,
        created_by TEXT NOT NULL,
        UNIQUE (principal, role, scope)
    );
    CREATE INDEX role_assignments_principal ON role_assignments(principal);
    CREATE TABLE images (
        tenant TEXT NOT NULL REFERENCES tenants(name),
        name TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (tenant, name)
    );
    CREATE TABLE vms (
        tenant TEXT NOT NULL REFERENCES tenants(name),
        name TEXT NOT NULL,
        id TEXT NOT NULL UNIQUE,
        vcpus INTEGER NOT NULL,
        memory_mib INTEGER NOT NULL,
        kernel TEXT NOT NULL,
        initrd TEXT,
        cmdline TEXT NOT NULL,
        desired TEXT NOT NULL,
        state TEXT NOT NULL,
        handle TEXT,
        last_exit_status INTEGER,
        last_stop_reason TEXT,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        started_at TEXT,
        PRIMARY KEY (tenant, name)
    );
    CREATE TABLE idempotency (
        principal TEXT NOT NULL,
        key TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        status INTEGER,
        body TEXT,
        created_at TEXT NOT NULL,
        PRIMARY KEY (principal, key)
    );
    """,
    # 2: virtio devices for VMs: disks (JSON list of {"image", "readonly"}) and rng
    """
    ALTER TABLE vms ADD COLUMN disks TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE vms ADD COLUMN rng INTEGER NOT NULL DEFAULT 0
    """,
    # 3: tenant virtual networks and VM NICs on them (isovisor.host.network). `id` names
    # the host objects: bridge isvb-ID and nft table isovisor-net-ID; TAP isvt-ID and nft
    # table isovisor-nic-ID for a NIC.
    """
    CREATE TABLE networks (
        tenant TEXT NOT NULL REFERENCES tenants(name),
        name TEXT NOT NULL,
        id TEXT NOT NULL UNIQUE,
        cidr TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (tenant, name)
    );
    CREATE TABLE nics (
        id TEXT PRIMARY KEY,
        vm_id TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
        slot INTEGER NOT NULL,
        network_id TEXT NOT NULL REFERENCES networks(id),
        mac TEXT NOT NULL UNIQUE,
        ip TEXT NOT NULL,
        UNIQUE (vm_id, slot),
        UNIQUE (network_id, ip)
    )
    """,
    # 4: encrypted disks (issue #9, storage half): a tenant's key wrapped by the host
    # master key; each disk's AES-XTS-256 key wrapped by its tenant's key
    # (isovisor.host.keys). Deleting a tenant deletes its key row.
    """
    CREATE TABLE tenant_keys (
        tenant TEXT PRIMARY KEY REFERENCES tenants(name) ON DELETE CASCADE,
        wrapped BLOB NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE TABLE disks (
        tenant TEXT NOT NULL REFERENCES tenants(name),
        name TEXT NOT NULL,
        id TEXT NOT NULL UNIQUE,
        size INTEGER NOT NULL,
        wrapped_key BLOB NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (tenant, name)
    )
    """,
    # 5: a VM's private encrypted copy of a writable image disk is a disk row owned by
    # the VM (hidden from the API; name `~VMID-INDEX`), shredded with the VM
    """
    ALTER TABLE disks ADD COLUMN vm_id TEXT
    """,
]


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self.migrate()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                               isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        # Deleted rows (wrapped keys of shredded disks and tenants) are overwritten in the
        # file, not just unlinked from the b-tree (issue #9).
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return conn

    @property
    def conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A BEGIN IMMEDIATE transaction: committed on success, rolled back on error."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def migrate(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Tenants, principals and role assignments are for the daemon's eyes only; SQLite
        # gives its -wal and -shm files the database file's mode (finding F-002).
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
        os.chmod(self.path, 0o600)
        with self.write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path} has schema version {version}, newer than this isovisord "
                    f"({len(MIGRATIONS)}); refusing to touch it")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={number}")

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
