"""Disk keys wrapped by tenant keys wrapped by the host master key (RFC 3394 AES key wrap,
`cryptography`'s aes_key_wrap), all wrapped forms in the state database:

    master key (32 B, MasterKeySource)  wraps  tenant_keys.wrapped  (32 B tenant key)
    tenant key                          wraps  disks.wrapped_key    (64 B AES-XTS-256 key)

Crypto-shredding (issue #9): deleting a disk deletes its wrapped key and rotates its
tenant's key in the same transaction (a fresh tenant key; every remaining disk key of the
tenant rewrapped), so a copy of the old wrapped disk key taken before the deletion (a
backup, a snapshot of the state directory) unwraps under no key left on the host.
Deleting a tenant deletes its wrapped tenant key. The database runs with
`secure_delete=ON` and is checkpointed (`wal_checkpoint(TRUNCATE)`) after a shred, so the
old rows are overwritten in the file and the WAL is emptied.

Unwrapped keys live only in this process's memory while a VM starts, and in its jailed
worker (which needs them); they are never written to a file.
"""

from __future__ import annotations

import os
import sqlite3

from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_wrap,
)

from isovisor.host.keys.master_key import MasterKeySource
from isovisor.host.models import now

TENANT_KEY_BYTES = 32
DISK_KEY_BYTES = 64


class UnwrapError(Exception):
    """A wrapped key does not unwrap (tampered, or under a destroyed key)."""


def new_disk_key() -> bytes:
    while True:
        key = os.urandom(DISK_KEY_BYTES)
        if key[:32] != key[32:]:  # XTS wants distinct halves (never equal in practice)
            return key


class KeyHierarchy:
    def __init__(self, master: MasterKeySource) -> None:
        self._source = master
        self._master: bytes | None = None

    def use_source(self, source: MasterKeySource) -> None:
        """Take the master key from `source` instead (before it was first loaded: the
        daemon switches to the TPM-sealed key once its TPM is up)."""
        if self._master is not None:
            raise RuntimeError("the master key was already loaded from another source")
        self._source = source

    def ensure(self) -> None:
        """Load (or create) the master key now: a daemon with an unusable one fails at
        start, naming the file, rather than at the first disk."""
        self._master_key()

    def _master_key(self) -> bytes:
        if self._master is None:
            self._master = self._source.load()
        return self._master

    def tenant_key(self, conn: sqlite3.Connection, tenant: str) -> bytes:
        """The tenant's key, made (and stored wrapped) on first use. Inside a write
        transaction when it may be created."""
        row = conn.execute("SELECT wrapped FROM tenant_keys WHERE tenant = ?",
                           (tenant,)).fetchone()
        if row is None:
            key = os.urandom(TENANT_KEY_BYTES)
            conn.execute("INSERT INTO tenant_keys (tenant, wrapped, created_at) "
                         "VALUES (?, ?, ?)", (tenant, aes_key_wrap(self._master_key(), key),
                                              now()))
            return key
        return self._unwrap(self._master_key(), bytes(row[0]), f"tenant {tenant!r}'s key")

    def wrap_disk_key(self, conn: sqlite3.Connection, tenant: str, key: bytes) -> bytes:
        return aes_key_wrap(self.tenant_key(conn, tenant), key)

    def unwrap_disk_key(self, conn: sqlite3.Connection, tenant: str, wrapped: bytes) -> bytes:
        return self._unwrap(self.tenant_key(conn, tenant), wrapped, "a disk key")

    def rotate_tenant_key(self, conn: sqlite3.Connection, tenant: str) -> None:
        """A fresh tenant key; every disk key of the tenant rewrapped under it; the old
        tenant key gone (inside the caller's write transaction)."""
        old = self.tenant_key(conn, tenant)
        new = os.urandom(TENANT_KEY_BYTES)
        for disk_id, wrapped in conn.execute(
                "SELECT id, wrapped_key FROM disks WHERE tenant = ?", (tenant,)).fetchall():
            key = self._unwrap(old, bytes(wrapped), "a disk key")
            conn.execute("UPDATE disks SET wrapped_key = ? WHERE id = ?",
                         (aes_key_wrap(new, key), disk_id))
        conn.execute("UPDATE tenant_keys SET wrapped = ?, created_at = ? WHERE tenant = ?",
                     (aes_key_wrap(self._master_key(), new), now(), tenant))

    @staticmethod
    def destroy_tenant_key(conn: sqlite3.Connection, tenant: str) -> None:
        conn.execute("DELETE FROM tenant_keys WHERE tenant = ?", (tenant,))

    @staticmethod
    def _unwrap(kek: bytes, wrapped: bytes, what: str) -> bytes:
        try:
            return aes_key_unwrap(kek, wrapped)
        except (InvalidUnwrap, ValueError):
            raise UnwrapError(f"{what} does not unwrap (tampered, or its key was "
                            "destroyed)") from None
