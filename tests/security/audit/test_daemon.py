"""The audit log in the daemon: what the hooks record, who may read it through the API,
and the acceptance test: SIGKILL isovisord during a burst of concurrent API requests,
restart it, and prove every acknowledged request has its record and the chain verifies."""

from __future__ import annotations

import os
import random
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from isovisor.api.pipeline import RequestRecord
from isovisor.api.tls import client_context
from isovisor.host.lifecycle import LifecycleEvent
from isovisor.host.models import VmState
from isovisor.host.vms import VmSpec
from isovisor.security.audit import Status, load_public_key, verify_log
from isovisor.security.audit.export import read_entries
from isovisor.security.audit.hooks import AUDIT_DIR_NAME, KEY_PATH, HostAudit
from isovisor.security.rbac import ROOT, Scope
from tests.api.stack import Stack, build_stack
from tests.security.audit.helpers import REPO


def _request(**over: object) -> RequestRecord:
    fields: dict[str, object] = {
        "request_id": "r1", "time": "2026-01-01T00:00:00.000+00:00", "client": "127.0.0.1:5",
        "principal": "alice", "certificate_serial": "ab", "method": "POST",
        "path": "/v1/tenants", "action": "tenants/write", "scope": "/", "decision": "allow",
        "status": 201, "outcome": "success", "error_code": None, "duration_ms": 1.0}
    fields.update(over)
    return RequestRecord(**fields)  # type: ignore[arg-type]


def test_hooks_record_requests_transitions_and_security_events(tmp_path: Path) -> None:
    audit = HostAudit(tmp_path)
    audit.record_request(_request())
    audit.record_request(_request(request_id="r2", status=409, outcome="failure",
                                  error_code="QuotaExceeded", scope="/tenants/t/vms/v"))
    audit.record_request(_request(request_id="r3", status=401, outcome="failure",
                                  error_code="Unauthenticated", principal=None,
                                  action=None, scope=None, decision=None))
    audit.record_transition(LifecycleEvent("t", "v", "id1", VmState.STOPPED,
                                           VmState.STARTING, "start requested", "alice",
                                           "2026-01-01T00:00:00Z"))
    audit.record_transition(LifecycleEvent("t", "v", "id1", VmState.STOPPED, None,
                                           "deleted", "alice", "2026-01-01T00:00:01Z"))
    audit.security_hook()("authentication_failure", "certificate expired", "10.0.0.9:1")
    audit.close()
    got = [(e.kind, e.fields["data"]) for _, e in read_entries(tmp_path / AUDIT_DIR_NAME)
           if e.kind != "audit.opened" and e.type.value == "record"]
    kinds = [k for k, _ in got]
    assert kinds == ["api.request", "security.quota-refused", "api.request",
                     "security.auth-failure", "api.request", "vm.lifecycle", "vm.lifecycle",
                     "security.auth-failure"]
    assert got[0][1]["principal"] == "alice" and got[0][1]["decision"] == "allow"
    assert "no certificate" in got[3][1]["detail"] and got[4][1]["status"] == 401
    assert got[5][1]["from"] == "stopped" and got[5][1]["to"] == "starting"
    assert got[6][1]["to"] == "deleted"
    assert "10.0.0.9:1" in got[7][1]["detail"]
    public = load_public_key((tmp_path / KEY_PATH).with_suffix(".pub"))
    assert verify_log(tmp_path / AUDIT_DIR_NAME, public).status is Status.VERIFIED


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, HostAudit]]:
    s = build_stack(tmp_path_factory.mktemp("audit-api"))
    audit = HostAudit(s.service.state_dir)
    s.api.add_request_observer(audit.record_request)
    s.service.lifecycle.observers.append(audit.record_transition)
    s.service.tenants.create("t")
    s.service.images.put("t", "k", [b"\x7fELF"])
    yield s, audit
    s.close()
    audit.close()


def test_only_auditor_at_root_and_host_admin_read_the_log(
        stack: tuple[Stack, HostAudit]) -> None:
    s, _ = stack
    svc = s.service
    svc.bootstrap_admin("root-admin")
    svc.access.assign("auditor", "Auditor", ROOT, "test")
    svc.access.assign("tenant-auditor", "Auditor", Scope.tenant("t"), "test")
    svc.access.assign("owner", "Owner", ROOT, "test")
    expect = {"root-admin": 200, "auditor": 200, "tenant-auditor": 403, "owner": 403}
    with s.client(s.identity("root-admin")) as c:
        for _ in range(2):  # requests on record to page through
            assert c.get("/v1/host").status_code == 200
    for name, status in expect.items():
        with s.client(s.identity(name)) as c:
            r = c.get("/v1/audit", params={"kind": "api.request", "limit": 1})
            assert r.status_code == status, (name, r.text)
            if status == 200:
                body = r.json()
                assert body["items"] and all(i["kind"] == "api.request"
                                             for i in body["items"])
                assert body["nextPageToken"] is not None
            # Nobody can change or delete the log through the API: no such operation.
            for method in ("POST", "PUT", "PATCH", "DELETE"):
                assert c.request(method, "/v1/audit").status_code == 405, (name, method)


def test_api_requests_and_vm_transitions_are_recorded(stack: tuple[Stack, HostAudit]) -> None:
    s, audit = stack
    s.service.bootstrap_admin("root-admin")
    s.service.create_vm("t", VmSpec(name="v1", kernel="k"), start=True, actor="root-admin")
    with s.client(s.identity("nobody")) as c:
        denied = c.get("/v1/tenants/t")
    assert denied.status_code == 404
    audit.log.sync()
    entries = [e for _, e in read_entries(s.service.state_dir / AUDIT_DIR_NAME)]
    requests = {e.fields["data"]["request_id"]: e.fields["data"] for e in entries
                if e.kind == "api.request"}
    rec = requests[denied.headers["x-request-id"]]
    assert rec["principal"] == "nobody" and rec["decision"] == "hidden" and rec["status"] == 404
    moves = [(e.fields["data"]["from"], e.fields["data"]["to"]) for e in entries
             if e.kind == "vm.lifecycle" and e.fields["data"]["scope"] == "/tenants/t/vms/v1"]
    assert ("created", "stopped") in moves or moves[0][0] == "created"
    assert any(to == "running" for _, to in moves)


def test_a_request_that_cannot_be_recorded_is_not_acknowledged(
        stack: tuple[Stack, HostAudit], tmp_path: Path) -> None:
    s, _ = stack
    s.service.bootstrap_admin("root-admin")
    dead = HostAudit(tmp_path)
    dead.close()  # appends now raise AuditUnavailableError
    s.api.observers.append(dead.record_request)
    try:
        with s.client(s.identity("root-admin")) as c:
            r = c.post("/v1/tenants", json={"name": "unrecorded"})
    finally:
        s.api.observers.remove(dead.record_request)
    assert r.status_code == 500 and "could not be recorded" in r.text


# -- the acceptance test: SIGKILL the daemon in a burst of requests ----------------------

ROUNDS = 2
CLIENTS = 6
_LISTENING = re.compile(rb"listening on https://localhost:(\d+)")


class Daemon:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "isovisor.host.daemon", "--state-dir", str(state),
             "--listen", "127.0.0.1:0", "--bootstrap-admin", "admin"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.port = self._wait_listening()

    def _wait_listening(self) -> int:
        assert self.proc.stdout is not None
        buf = b""
        deadline = time.monotonic() + 60
        while (m := _LISTENING.search(buf)) is None:
            assert time.monotonic() < deadline, f"isovisord did not start: {buf!r}"
            ready, _, _ = select.select([self.proc.stdout], [], [], 1)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    err = self.proc.stderr.read() if self.proc.stderr else b""
                    pytest.fail(f"isovisord exited: {buf!r} {err!r}")
                buf += chunk
        return int(m.group(1))

    def client(self) -> httpx.Client:
        ctx = client_context(self.state / "ca" / "ca.crt", self.state / "admin" / "admin.crt",
                             self.state / "admin" / "admin.key")
        return httpx.Client(base_url=f"https://localhost:{self.port}", verify=ctx,
                            timeout=10.0)

    def end(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)
        try:
            self.proc.communicate(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def _burst(daemon: Daemon, run: int, acked: dict[str, int], lock: threading.Lock,
           stop: threading.Event) -> list[threading.Thread]:
    def client_loop(n: int) -> None:
        try:
            with daemon.client() as c:
                i = 0
                while not stop.is_set():
                    if i % 2:
                        r = c.get("/v1/host")
                    else:
                        r = c.post("/v1/tenants", json={"name": f"r{run}-c{n}-{i}"})
                    with lock:  # an answer is an acknowledgement, whatever its status
                        acked[r.headers["x-request-id"]] = r.status_code
                    i += 1
        except httpx.HTTPError:
            return  # the daemon died under us: requests in flight were not acknowledged

    threads = [threading.Thread(target=client_loop, args=(n,), daemon=True)
               for n in range(CLIENTS)]
    for t in threads:
        t.start()
    return threads


def test_sigkill_isovisord_during_a_burst_loses_no_acknowledged_request(
        tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    state = tmp_path / "state"
    acked: dict[str, int] = {}
    lock = threading.Lock()
    for run in range(ROUNDS):
        daemon = Daemon(state)
        stop = threading.Event()
        before = len(acked)
        threads = _burst(daemon, run, acked, lock, stop)
        deadline = time.monotonic() + 30
        while len(acked) < before + CLIENTS and time.monotonic() < deadline:
            time.sleep(0.01)  # every client is connected and answered once
        time.sleep(rng.uniform(0.0, 0.5))  # then a random point in the burst
        daemon.end(signal.SIGKILL)
        stop.set()
        for t in threads:
            t.join(15)
        assert len(acked) > before, f"round {run}: no request was answered (seed {seed})"
    # The daemon was restarted after the first kill; after the last one the log is read
    # as the kill left it (never found tampered), then recovered and sealed as a restart
    # would, in this process (a third daemon start would only cost time).
    public = load_public_key((state / KEY_PATH).with_suffix(".pub"))
    report = verify_log(state / AUDIT_DIR_NAME, public)
    assert report.status is not Status.TAMPERED, (seed, report.lines())
    HostAudit(state).close()
    report = verify_log(state / AUDIT_DIR_NAME, public)
    assert report.status is Status.VERIFIED, (seed, report.lines())
    recorded = {e.fields["data"]["request_id"]: e.fields["data"]["status"]
                for _, e in read_entries(state / AUDIT_DIR_NAME) if e.kind == "api.request"}
    missing = sorted(set(acked) - set(recorded))
    assert not missing, f"{len(missing)} acknowledged requests unrecorded (seed {seed})"
    assert all(recorded[r] == status for r, status in acked.items())
    print(f"seed {seed}: {len(acked)} acknowledged requests over {ROUNDS} kills, all recorded")


def test_audit_settings_come_from_the_daemon_config_file(tmp_path: Path) -> None:
    import socket

    from isovisor.host.config import DaemonConfig
    from isovisor.security.audit import AuditConfigError
    from isovisor.security.audit.hooks import HostAuditConfig

    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(5)
    toml = tmp_path / "isovisord.toml"
    toml.write_text(f'[audit]\ncheckpoint_records = 2\ndurable_reads = false\n'
                    f'syslog = "udp:127.0.0.1:{server.getsockname()[1]}"\n'
                    f'syslog_checkpoints_only = true\n')
    config = DaemonConfig.load(toml, state_dir=tmp_path / "state")
    audit_config = HostAuditConfig.from_table(config.extra["audit"])
    assert audit_config.checkpoint_records == 2 and not audit_config.durable_reads
    audit = HostAudit(tmp_path / "state", audit_config)
    audit.record_request(_request())
    audit.close()
    got = server.recv(70_000)
    server.close()
    assert b'"type":"genesis"' in got  # genesis and checkpoints leave the host
    toml.write_text("[audit]\ncheckpoint_every = 3\n")
    with pytest.raises(AuditConfigError, match="unknown setting"):
        HostAuditConfig.from_table(DaemonConfig.load(toml).extra["audit"])
