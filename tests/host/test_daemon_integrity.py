"""isovisord with its [integrity] table, end to end through the mutual-TLS API and a real
swtpm the daemon starts itself: a VM starts while everything verifies; after a code file
changes, or a kernel parameter leaves the policy, a VM start is refused with 503
LaunchRefused naming the file or the measurement, and the audit log records why."""

from __future__ import annotations

from pathlib import Path

import pytest

from isovisor.api.client import ApiClient, ApiError, ClientConfig
from isovisor.host.config import DaemonConfig
from isovisor.host.daemon import Daemon
from isovisor.host.integrity import tpm_file
from isovisor.kvm import Kvm
from isovisor.security.audit.export import read_entries
from isovisor.security.audit.hooks import AUDIT_DIR_NAME
from tests.security.integrity.integrity_setup import IntegrityFiles, make_integrity_files


def _client(daemon: Daemon) -> ApiClient:
    assert daemon.admin is not None
    return ApiClient(ClientConfig(daemon.endpoint, daemon.ca.cert_path, daemon.admin.cert,
                                  daemon.admin.key))


def _daemon(tmp_path: Path, files: IntegrityFiles) -> Daemon:
    config = DaemonConfig(state_dir=tmp_path / "state", listen="127.0.0.1:0",
                          bootstrap_admin="admin",
                          extra={"integrity": files.config_table()})
    daemon = Daemon(config)
    daemon.start()
    return daemon


def _security_records(state: Path, kind: str) -> list[dict[str, object]]:
    return [e.fields["data"] for _, e in read_entries(state / AUDIT_DIR_NAME)
            if e.type.value == "record" and e.kind == kind]


def _refused_start(c: ApiClient, name: str) -> ApiError:
    with pytest.raises(ApiError) as info:
        c.post("/v1/tenants/a/vms", json={"name": name, "kernel": "k", "memoryMiB": 64})
    return info.value


def test_tampered_code_refuses_the_next_vm_start(
        tmp_path: Path, kvm: Kvm, built_guests: dict[str, Path]) -> None:
    files = make_integrity_files(tmp_path / "integrity")
    daemon = _daemon(tmp_path, files)
    state = daemon.config.state_dir
    try:
        assert daemon.integrity is not None and daemon.integrity.swtpm is not None
        assert daemon.integrity.swtpm.running and tpm_file(state).exists()
        integrity = state / "integrity"
        for path, mode in ((integrity, 0o700), (integrity / "swtpm", 0o700),
                           (integrity / "swtpm" / "swtpm.sock", 0o600),
                           (integrity / "eventlog.json", 0o600)):
            assert path.stat().st_mode & 0o777 == mode, path
        with _client(daemon) as c:
            c.post("/v1/tenants", json={"name": "a"})
            c.put("/v1/tenants/a/images/k", content=built_guests["hello"].read_bytes())
            ok = c.post("/v1/tenants/a/vms", json={"name": "good", "kernel": "k",
                                                   "memoryMiB": 64})
            assert ok["state"] in ("running", "stopped")  # hello may already have ended
            assert ok.get("lastStopReason") is None or "start failed" not in ok[
                "lastStopReason"]

            victim = files.code_root / "mod2.py"
            victim.write_text("VALUE = __import__('os').system('id')\n")
            err = _refused_start(c, "second")
            assert err.status == 503 and err.code == "LaunchRefused"
            assert f"VMM integrity: code file {victim} was modified" in err.message
            vm = c.get("/v1/tenants/a/vms/second")
            assert vm["state"] == "stopped" and str(victim) in vm["lastStopReason"]
            c.delete("/v1/tenants/a/vms/good")  # VMs outlive the daemon: end it here
    finally:
        daemon.stop()
    assert daemon.integrity.swtpm is None  # stopped with the daemon
    records = _security_records(state, "security.integrity-failure")
    assert len(records) == 1 and str(victim) in str(records[0]["detail"])
    assert records[0]["scope"] == "/tenants/a/vms/second"
    assert records[0]["source"] == "isovisord" and records[0]["tenant"] == "a"
    assert records[0]["vm_id"]


def test_kernel_parameter_outside_policy_refuses_start(tmp_path: Path) -> None:
    files = make_integrity_files(tmp_path / "integrity")
    param = files.measure_root / "sys/module/kvm/parameters/ignore_msrs"
    daemon = _daemon(tmp_path, files)
    state = daemon.config.state_dir
    try:
        with _client(daemon) as c:
            c.post("/v1/tenants", json={"name": "a"})
            c.put("/v1/tenants/a/images/k", content=b"not even a kernel")
            param.write_text("Y\n")
            err = _refused_start(c, "v")
            assert err.status == 503 and err.code == "LaunchRefused"
            assert "measurement kvm.kvm.ignore_msrs (PCR 12" in err.message
            assert "'Y' is not accepted by the policy (accepted: 'N')" in err.message
    finally:
        daemon.stop()
    records = _security_records(state, "security.launch-gate-refused")
    assert [r["scope"] for r in records] == ["/tenants/a/vms/v"]
    assert "kvm.kvm.ignore_msrs" in str(records[0]["detail"])
    transitions = _security_records(state, "vm.lifecycle")
    assert any("start failed: platform integrity: measurement kvm.kvm.ignore_msrs"
               in str(t["reason"]) for t in transitions)


def test_a_host_failing_at_start_is_audited_and_runs_nothing(tmp_path: Path) -> None:
    files = make_integrity_files(tmp_path / "integrity")
    (files.measure_root / "proc/sys/kernel/randomize_va_space").write_text("0\n")
    daemon = _daemon(tmp_path, files)  # it starts: its API says why VMs cannot
    state = daemon.config.state_dir
    try:
        with _client(daemon) as c:
            c.post("/v1/tenants", json={"name": "a"})
            c.put("/v1/tenants/a/images/k", content=b"not even a kernel")
            err = _refused_start(c, "v")
            assert err.code == "LaunchRefused" and "kernel.randomize_va_space" in err.message
    finally:
        daemon.stop()
    records = _security_records(state, "security.launch-gate-refused")
    assert [r["scope"] for r in records] == [None, "/tenants/a/vms/v"]  # start, then the VM
