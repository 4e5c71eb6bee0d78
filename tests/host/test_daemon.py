"""isovisord end to end: start with embedded defaults, boot a VM through the mutual-TLS
API, restart the daemon, find the VM still running, re-adopted, and type into its
console."""

from __future__ import annotations

import time
from pathlib import Path

from isovisor.api.client import ApiClient, ClientConfig
from isovisor.host.config import DaemonConfig
from isovisor.host.daemon import Daemon
from isovisor.kvm import Kvm


def _client(daemon: Daemon) -> ApiClient:
    assert daemon.admin is not None
    return ApiClient(ClientConfig(daemon.endpoint, daemon.ca.cert_path, daemon.admin.cert,
                                  daemon.admin.key))


def test_daemon_restart_keeps_and_readopts_a_running_vm(
        tmp_path: Path, kvm: Kvm, built_guests: dict[str, Path]) -> None:
    config = DaemonConfig(state_dir=tmp_path / "state", listen="127.0.0.1:0",
                          bootstrap_admin="admin")
    daemon = Daemon(config)
    daemon.start()
    try:
        with _client(daemon) as c:
            c.post("/v1/tenants", json={"name": "a"})
            c.put("/v1/tenants/a/images/echo", content=built_guests["echo"].read_bytes())
            vm = c.post("/v1/tenants/a/vms", json={"name": "e", "kernel": "echo",
                                                   "memoryMiB": 64})
            assert vm["state"] == "running"
            out, deadline = b"", time.monotonic() + 60
            while b"echo: ready" not in out:
                assert time.monotonic() < deadline
                out += c.raw("GET", "/v1/tenants/a/vms/e/console",
                             params={"offset": len(out), "wait": 5}).content
    finally:
        daemon.stop()

    daemon = Daemon(config)  # same state directory: the restart
    daemon.start()
    try:
        assert list(daemon.reconciled.values()) == ["adopted"]
        with _client(daemon) as c:
            again = c.get("/v1/tenants/a/vms/e")
            assert again["state"] == "running" and again["id"] == vm["id"]
            # console input still reaches the re-adopted guest: echo prints it and resets
            c.raw("POST", "/v1/tenants/a/vms/e/console", content=b"hello isovisor\r",
                  headers={"content-type": "application/octet-stream"})
            deadline = time.monotonic() + 30
            while b"echo: hello isovisor" not in out:
                assert time.monotonic() < deadline, out
                out += c.raw("GET", "/v1/tenants/a/vms/e/console",
                             params={"offset": len(out), "wait": 5}).content
            while c.get("/v1/tenants/a/vms/e")["state"] != "stopped":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            ended = c.get("/v1/tenants/a/vms/e")
            assert ended["lastExitStatus"] == 0 and ended["lastStopReason"] == "the guest reset"
    finally:
        daemon.stop()
