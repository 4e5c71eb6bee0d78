"""Idempotency keys on create: a retried POST with the same key and body gets the first
answer again; the same key with another body is refused."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import sqlite3
from dataclasses import dataclass

from isovisor.host.db import Database
from isovisor.host.errors import Conflict, InvalidRequest
from isovisor.host.models import now

KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
RETENTION = dt.timedelta(hours=24)


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: object


def fingerprint(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).hexdigest()


class IdempotencyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def claim(self, principal: str, key: str, fp: str) -> StoredResponse | None:
        """None: the key is now ours, run the request and `complete` it. Otherwise the stored
        answer to replay."""
        if not KEY_RE.match(key):
            raise InvalidRequest("Idempotency-Key must be 1 to 128 of A-Z a-z 0-9 . _ : -")
        cutoff = (dt.datetime.now(dt.UTC) - RETENTION).isoformat(timespec="milliseconds")
        with self.db.write() as conn:
            conn.execute("DELETE FROM idempotency WHERE created_at < ?", (cutoff,))
            row = conn.execute("SELECT * FROM idempotency WHERE principal = ? AND key = ?",
                               (principal, key)).fetchone()
            if row is None:
                conn.execute("INSERT INTO idempotency (principal, key, fingerprint, created_at)"
                             " VALUES (?, ?, ?, ?)", (principal, key, fp, now()))
                return None
        return self._stored(row, fp)

    @staticmethod
    def _stored(row: sqlite3.Row, fp: str) -> StoredResponse:
        if row["fingerprint"] != fp:
            raise InvalidRequest("this Idempotency-Key was used for a different request")
        if row["status"] is None:
            raise Conflict("a request with this Idempotency-Key is still in progress")
        return StoredResponse(row["status"], json.loads(row["body"]))

    def complete(self, principal: str, key: str, status: int, body: object) -> None:
        with self.db.write() as conn:
            conn.execute("UPDATE idempotency SET status = ?, body = ? WHERE principal = ? "
                         "AND key = ?", (status, json.dumps(body), principal, key))

    def release(self, principal: str, key: str) -> None:
        """The request failed: forget the key so that a retry runs again."""
        with self.db.write() as conn:
            conn.execute("DELETE FROM idempotency WHERE principal = ? AND key = ? AND status IS "
                         "NULL", (principal, key))
