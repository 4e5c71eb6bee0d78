"""isovisord with its [integrity] table, end to end through the mutual-TLS API and a real
swtpm the daemon starts itself: a VM starts while everything verifies; after a code file
changes, or a kernel parameter leaves the policy, a VM start is refused with 503
LaunchRefused naming the file or the measurement, and the audit log records why. A daemon
whose start-up fails after it started its swtpm stops that swtpm (no process left), and a
daemon without the table says plainly that VMs are not gated."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from isovisor.api.client import ApiClient, ApiError, ClientConfig
from isovisor.host import daemon as daemon_main
from isovisor.host.config import DaemonConfig
from isovisor.host.daemon import Daemon
from isovisor.host.integrity import tpm_file
from isovisor.kvm import Kvm
from isovisor.security.audit.export import read_entries
from isovisor.security.audit.hooks import AUDIT_DIR_NAME
from isovisor.security.integrity.errors import IntegrityError
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


def _swtpm_pids(state: Path) -> list[int]:
    """swtpm processes whose state directory is under `state` (from /proc, not from the
    daemon's own bookkeeping)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"swtpm") and any(str(state).encode() in a for a in argv):
            pids.append(int(entry.name))
    return pids


# uvicorn's server thread ends with SystemExit when it cannot bind: that is the failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_daemon_whose_api_cannot_listen_stops_its_swtpm(tmp_path: Path) -> None:
    files = make_integrity_files(tmp_path / "integrity")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = DaemonConfig(state_dir=tmp_path / "state", listen=f"127.0.0.1:{port}",
                              extra={"integrity": files.config_table()})
        daemon = Daemon(config)
        assert daemon.integrity is not None and daemon.integrity.swtpm is not None
        pid = daemon.integrity.swtpm.proc.pid if daemon.integrity.swtpm.proc else None
        assert pid is not None and _swtpm_pids(config.state_dir) == [pid]
        with pytest.raises(RuntimeError, match="failed to start"):
            daemon.start()
    assert daemon.integrity.swtpm is None
    assert _swtpm_pids(config.state_dir) == []
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped, not a zombie


def test_a_daemon_failing_after_its_swtpm_started_stops_it(tmp_path: Path) -> None:
    """isovisord (the command) with a server certificate it cannot use: start-up fails
    after the TPM was opened and measured; the swtpm goes with it."""
    files = make_integrity_files(tmp_path / "integrity")
    state = tmp_path / "state"
    tls = state / "tls"
    tls.mkdir(parents=True, mode=0o700)
    (tls / "server.crt").write_text("not a certificate\n")
    (tls / "server.key").write_text("not a key\n")
    config = tmp_path / "isovisord.toml"
    config.write_text("[integrity]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in files.config_table().items()))
    argv = ["--config", str(config), "--state-dir", str(state), "--listen", "127.0.0.1:0"]
    assert daemon_main.run(daemon_main.parser().parse_args(argv)) == 1
    assert (state / "integrity" / "eventlog.json").exists()  # the TPM was reached
    assert _swtpm_pids(state) == []


def test_an_integrity_table_the_gate_refuses_at_open_stops_the_swtpm(tmp_path: Path) -> None:
    files = make_integrity_files(tmp_path / "integrity")
    table = {**files.config_table(), "platform_pcr": 16}  # resettable: refused at open
    config = DaemonConfig(state_dir=tmp_path / "state", listen="127.0.0.1:0",
                          extra={"integrity": table})
    with pytest.raises(IntegrityError, match=r"PCR \[16\] can be reset"):
        Daemon(config)
    assert (config.state_dir / "integrity" / "swtpm" / "swtpm.log").exists()  # it ran
    assert _swtpm_pids(config.state_dir) == []


def test_without_an_integrity_table_the_daemon_says_vms_are_not_gated(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = DaemonConfig(state_dir=tmp_path / "state", listen="127.0.0.1:0")
    with caplog.at_level(logging.WARNING):
        daemon = Daemon(config)
    try:
        assert daemon.integrity is None and daemon.service.lifecycle.launch_gate is None
        assert "VMs ARE NOT GATED" in caplog.text
        assert daemon.gate_line.startswith("VMs ARE NOT GATED")
    finally:
        daemon.stop()
