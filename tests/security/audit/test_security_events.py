"""The security events the daemon sees itself, through a real isovisord (in-process, inert
VM runner): an authentication failure (no client certificate; a certificate from another
CA) and a quota refusal each become a `security.*` record; and the recorder the launch
gate and integrity checks call records durably with the VM's scope, id and tenant."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from isovisor.api.tls import client_context
from isovisor.host.config import DaemonConfig
from isovisor.host.daemon import Daemon
from isovisor.host.models import Quota
from isovisor.security.audit import Status, load_public_key, verify_log
from isovisor.security.audit.export import read_entries
from isovisor.security.audit.hooks import AUDIT_DIR_NAME, KEY_PATH
from isovisor.security.audit.recorders import SECURITY_LAUNCH_GATE
from isovisor.security.pki import CertificateAuthority
from tests.api.stack import InertRunner


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(DaemonConfig(state_dir=tmp_path / "state", listen="127.0.0.1:0",
                            bootstrap_admin="admin"), runner=InertRunner(tmp_path / "run"))
    d.start()
    yield d
    d.stop()


def _client(d: Daemon, cert: Path | None, key: Path | None) -> httpx.Client:
    return httpx.Client(base_url=d.endpoint, timeout=10.0,
                        verify=client_context(d.ca.cert_path, cert, key))


def _security(d: Daemon) -> list[tuple[str, dict[str, Any]]]:
    d.audit.log.sync()
    return [(e.kind, dict(e.fields["data"]))
            for _, e in read_entries(d.config.state_dir / AUDIT_DIR_NAME)
            if e.kind is not None and e.kind.startswith("security.")]


def test_authentication_failures_are_recorded(daemon: Daemon, tmp_path: Path) -> None:
    with _client(daemon, None, None) as c, pytest.raises((httpx.HTTPError, ssl.SSLError)):
        c.get("/v1/host")  # no client certificate: the handshake is refused
    other = CertificateAuthority.init(tmp_path / "other-ca")
    issued = other.issue("admin")  # the right name, from the wrong CA
    (tmp_path / "o.crt").write_bytes(issued.cert_pem)
    (tmp_path / "o.key").write_bytes(issued.key_pem)
    with _client(daemon, tmp_path / "o.crt", tmp_path / "o.key") as c, \
            pytest.raises((httpx.HTTPError, ssl.SSLError)):
        c.get("/v1/host")
    failures = [d for k, d in _security(daemon) if k == "security.auth-failure"]
    assert len(failures) >= 2, failures
    assert all("TLS handshake refused" in d["detail"] or "certificate" in d["detail"]
               for d in failures), failures


def test_a_quota_refusal_is_recorded(daemon: Daemon) -> None:
    admin = daemon.admin
    assert admin is not None
    with _client(daemon, admin.cert, admin.key) as c:
        assert c.post("/v1/tenants", json={"name": "small"}).status_code == 201
        daemon.service.tenants.set_quota("small", Quota(max_vcpus=1, max_memory_mib=64,
                                                         max_vms=1))
        assert c.put("/v1/tenants/small/images/k", content=b"\x7fELF").status_code == 201
        body = {"kernel": "k", "memoryMiB": 64, "vcpus": 1}
        assert c.post("/v1/tenants/small/vms", json={"name": "a", **body}).status_code == 201
        refused = c.post("/v1/tenants/small/vms", json={"name": "b", **body})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "QuotaExceeded"
    (rec,) = [d for k, d in _security(daemon) if k == "security.quota-refused"]
    assert "admin" in rec["detail"] and refused.headers["x-request-id"] in rec["detail"]
    assert rec["scope"] and rec["scope"].startswith("/tenants/small")


def test_the_launch_gate_recorder_names_the_vm(daemon: Daemon) -> None:
    daemon.audit.vm_security_event(
        SECURITY_LAUNCH_GATE, tenant="acme", vm="web", vm_id="0123abcd",
        source="launch-gate", detail="kernel digest not on the allow list")
    entries = [e for _, e in read_entries(daemon.config.state_dir / AUDIT_DIR_NAME)]
    last = entries[-1]  # written (and fsynced: durable=True) before it returned
    assert last.kind == "security.launch-gate-refused"
    assert last.fields["data"]["scope"] == "/tenants/acme/vms/web"
    assert last.fields["data"]["vm_id"] == "0123abcd"
    assert last.fields["data"]["tenant"] == "acme"
    daemon.stop()
    public = load_public_key((daemon.config.state_dir / KEY_PATH).with_suffix(".pub"))
    assert verify_log(daemon.config.state_dir / AUDIT_DIR_NAME, public).status \
        is Status.VERIFIED
