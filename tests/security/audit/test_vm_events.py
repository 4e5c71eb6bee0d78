"""VM-side security events reach the daemon's audit log, through the real daemon, the real
monitor, `isovisor run` and its jailed worker: a hostile guest's malformed virtio chain
(NEEDS_RESET) and a worker killed by seccomp (the worker's test hook) each become a
`security.*` record naming the VM, its id and its tenant; the channel's reader survives a
hostile channel (malformed, overlong, torn lines, a flood)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from isovisor.api.client import ApiClient, ClientConfig
from isovisor.host.config import DaemonConfig
from isovisor.host.daemon import Daemon
from isovisor.host.runner import Launch, SubprocessRunner, default_command
from isovisor.kvm import Kvm
from isovisor.security.audit.export import read_entries
from isovisor.security.audit.hooks import AUDIT_DIR_NAME
from isovisor.worker.test_hook import ENABLE_ENV
from tests.security.audit.helpers import REPO

GUEST = Path(__file__).parent / "guests" / "virtio_hostile.asm"


@pytest.fixture(scope="module")
def hostile_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("nasm") is None:
        pytest.fail("nasm is missing: run `make setup` (the Makefile installs it)")
    d = tmp_path_factory.mktemp("guest")
    subprocess.run(["nasm", "-f", "elf32", "-I", f"{REPO}/guests/include/", "-o",
                    str(d / "g.o"), str(GUEST)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-T", f"{REPO}/guests/guest.ld", "-o",
                    str(d / "g.elf"), str(d / "g.o")], check=True)
    return d / "g.elf"


def _client(daemon: Daemon) -> ApiClient:
    assert daemon.admin is not None
    return ApiClient(ClientConfig(daemon.endpoint, daemon.ca.cert_path, daemon.admin.cert,
                                  daemon.admin.key))


def _records(daemon: Daemon) -> list[tuple[str, dict[str, Any]]]:
    daemon.audit.log.sync()
    return [(e.kind, dict(e.fields["data"]))
            for _, e in read_entries(daemon.config.state_dir / AUDIT_DIR_NAME)
            if e.type.value == "record"]


def _wait_for(daemon: Daemon, kind: str, scope: str, timeout: float = 90.0
              ) -> list[tuple[str, dict[str, Any]]]:
    deadline = time.monotonic() + timeout
    while True:
        records = _records(daemon)
        if any(k == kind and d.get("scope") == scope for k, d in records):
            return records
        assert time.monotonic() < deadline, f"no {kind} record for {scope}: {records[-5:]}"
        time.sleep(0.25)


def _boot(tmp_path: Path, elf: Path, runner: SubprocessRunner | None = None,
          **vm: object) -> tuple[Daemon, dict[str, Any]]:
    config = DaemonConfig(state_dir=tmp_path / "state", listen="127.0.0.1:0",
                          bootstrap_admin="admin")
    daemon = Daemon(config, runner=runner)
    daemon.start()
    with _client(daemon) as c:
        c.post("/v1/tenants", json={"name": "acme"})
        c.put("/v1/tenants/acme/images/hostile", content=elf.read_bytes())
        created = c.post("/v1/tenants/acme/vms", json={"name": "h", "kernel": "hostile",
                                                       "memoryMiB": 64, **vm})
    return daemon, created


def test_a_hostile_guests_malformed_chain_is_in_the_daemons_audit_log(
        tmp_path: Path, kvm: Kvm, hostile_elf: Path) -> None:
    daemon, vm = _boot(tmp_path, hostile_elf, rng=True)
    try:
        records = _wait_for(daemon, "security.virtio-needs-reset", "/tenants/acme/vms/h")
        with _client(daemon) as c:
            c.post("/v1/tenants/acme/vms/h/stop")
    finally:
        daemon.stop()
    (rec,) = [d for k, d in records if k == "security.virtio-needs-reset"]
    assert rec["vm_id"] == vm["id"] and rec["tenant"] == "acme", rec
    assert "virtio-rng@0xd0000000" in rec["source"] and rec["source"].startswith("vmm: worker")
    assert "hops" in rec["detail"], rec  # the loop the guest built


def test_a_seccomp_kill_of_the_worker_is_in_the_daemons_audit_log(
        tmp_path: Path, kvm: Kvm, hostile_elf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENABLE_ENV, "1")  # the launcher in `isovisor run` inherits it

    def with_hook(launch: Launch, console: Path) -> list[str]:
        return [*default_command(launch, console), "--test-hook", "execve"]

    runner = SubprocessRunner(tmp_path / "state" / "run", command=with_hook)
    daemon, vm = _boot(tmp_path, hostile_elf, runner=runner)
    try:
        records = _wait_for(daemon, "security.seccomp-kill", "/tenants/acme/vms/h")
        deadline = time.monotonic() + 30
        while not any(k == "vm.lifecycle" and d["to"] == "stopped" and d["from"] == "running"
                      and d["scope"] == "/tenants/acme/vms/h" for k, d in records):
            assert time.monotonic() < deadline, records[-5:]
            time.sleep(0.2)
            records = _records(daemon)
    finally:
        daemon.stop()
    kinds = [(k, d.get("from"), d.get("to")) for k, d in records
             if d.get("scope") == "/tenants/acme/vms/h"]
    kill = kinds.index(("security.seccomp-kill", None, None))
    # read (at the latest) when the daemon saw the VM stop, before that is recorded
    assert kill < kinds.index(("vm.lifecycle", "running", "stopped")), kinds
    (rec,) = [d for k, d in records if k == "security.seccomp-kill"]
    assert rec["vm_id"] == vm["id"] and rec["tenant"] == "acme"
    assert "execve" in rec["detail"], rec
