"""Once the audit log cannot record, isovisord refuses requests before their routes run:
503 AuditUnavailable, and the action does not happen. The log is broken for real: it
lives on a tiny tmpfs that a filler file has filled (needs root to mount)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from isovisor.api.tls import client_context
from isovisor.host.config import DaemonConfig
from isovisor.host.daemon import Daemon
from isovisor.security.audit import Status, load_public_key, verify_log
from isovisor.security.audit.export import read_entries
from isovisor.security.audit.hooks import AUDIT_DIR_NAME, KEY_PATH
from isovisor.security.audit.segments import list_segments
from tests.api.stack import InertRunner

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@dataclass
class Broken:
    daemon: Daemon
    audit_dir: Path

    def client(self) -> httpx.Client:
        admin = self.daemon.admin
        assert admin is not None
        ctx = client_context(self.daemon.ca.cert_path, admin.cert, admin.key)
        return httpx.Client(base_url=self.daemon.endpoint, verify=ctx, timeout=10.0)

    def segment_slack(self) -> int:
        """Bytes left in the last page of the current segment (all tmpfs has left)."""
        segments, _ = list_segments(self.audit_dir)
        return -segments[-1].path.stat().st_size % 4096


@pytest.fixture
def on_tiny_tmpfs(tmp_path: Path) -> Iterator[Broken]:
    state = tmp_path / "state"
    audit_dir = state / AUDIT_DIR_NAME
    audit_dir.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0750", "audit-test",
                    str(audit_dir)], check=True)
    daemon: Daemon | None = None
    try:
        config = DaemonConfig(state_dir=state, listen="127.0.0.1:0", bootstrap_admin="admin",
                              extra={"audit": {"checkpoint_seconds": 3600.0}})
        daemon = Daemon(config, runner=InertRunner(tmp_path / "run"))
        daemon.start()
        # Fill the tmpfs: only the slack in the segment's last page is left.
        fd = os.open(audit_dir / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        yield Broken(daemon, audit_dir)
    finally:
        if daemon is not None:
            daemon.stop()
        subprocess.run(["umount", "-l", str(audit_dir)], check=False)


def _exists(daemon: Daemon, tenant: str) -> bool:
    return daemon.service.tenants.exists(tenant)


def _request_ids(audit_dir: Path, kind: str) -> set[str]:
    return {e.fields["data"]["request_id"] for _, e in read_entries(audit_dir)
            if e.kind == kind}


def test_a_failed_log_refuses_requests_before_they_run(on_tiny_tmpfs: Broken) -> None:
    b = on_tiny_tmpfs
    with b.client() as c:
        # Reads fill the last page until a record cannot be written: that answer is a 500
        # (the record failed after the read ran), and the log stops taking records.
        for _ in range(64):
            r = c.get("/v1/host")
            if r.status_code != 200:
                break
        assert r.status_code == 500 and "could not be recorded" in r.text
        assert b.daemon.audit.log.failed is not None
        # From now on every request is refused before its route runs.
        r = c.post("/v1/tenants", json={"name": "after-failure"})
        assert r.status_code == 503, r.text
        body = r.json()["error"]
        assert body["code"] == "AuditUnavailable" and "refused before it ran" in body["message"]
        assert not _exists(b.daemon, "after-failure")  # the action did not happen
        assert c.get("/v1/host").status_code == 503
    # What was written before the failure still verifies.
    public = load_public_key((b.daemon.config.state_dir / KEY_PATH).with_suffix(".pub"))
    os.unlink(b.audit_dir / "filler")
    assert verify_log(b.audit_dir, public).status in (Status.VERIFIED, Status.UNPROVEN)


def test_a_silently_broken_log_fails_on_the_intent_record_before_the_action(
        on_tiny_tmpfs: Broken) -> None:
    """No failure is known yet: the mutating request's own intent record is the first
    write that fails, so the request is refused before its route runs."""
    b = on_tiny_tmpfs
    log = b.daemon.audit.log
    # Use up the page's slack with padding records until less than an intent line is left.
    # (a padding line is ~170 bytes around its pad, an intent line ~400)
    while b.segment_slack() > 300:
        room = b.segment_slack()
        size = room - 300 if room > 700 else 1
        log.append("test.pad", {"pad": "x" * size}, durable=False)
    assert log.failed is None
    with b.client() as c:
        r = c.post("/v1/tenants", json={"name": "unrecordable"})
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "AuditUnavailable"
    assert not _exists(b.daemon, "unrecordable")
    # tmpfs takes the bytes that fit in the page (a short write) or none (ENOSPC)
    assert log.failed is not None and ("short write" in log.failed
                                       or "No space" in log.failed), log.failed
    os.unlink(b.audit_dir / "filler")
    public = load_public_key((b.daemon.config.state_dir / KEY_PATH).with_suffix(".pub"))
    assert verify_log(b.audit_dir, public).status is not Status.TAMPERED  # no torn line
    ids = _request_ids(b.audit_dir, "api.intent") | _request_ids(b.audit_dir, "api.request")
    assert r.headers["x-request-id"] not in ids  # refused requests leave nothing behind


def test_mutating_requests_leave_an_intent_before_their_record(tmp_path: Path) -> None:
    config = DaemonConfig(state_dir=tmp_path / "state", listen="127.0.0.1:0",
                          bootstrap_admin="admin")
    daemon = Daemon(config, runner=InertRunner(tmp_path / "run"))
    daemon.start()
    try:
        with Broken(daemon, tmp_path).client() as c:
            created = c.post("/v1/tenants", json={"name": "t1"})
            read = c.get("/v1/tenants/t1")
        daemon.audit.log.sync()
    finally:
        daemon.stop()
    entries = [e for _, e in read_entries(config.state_dir / AUDIT_DIR_NAME)]
    rid = created.headers["x-request-id"]
    order = [e.kind for e in entries
             if e.kind in ("api.intent", "api.request") and e.fields["data"]["request_id"] == rid]
    assert order == ["api.intent", "api.request"]
    assert read.headers["x-request-id"] not in {
        e.fields["data"]["request_id"] for e in entries if e.kind == "api.intent"}
