"""isovisord end to end with a disk: the VM's runner calls `isovisor run --disk ...`,
which now runs the VM in its jailed worker (no --no-jail), so a tenant's image reaches a
guest through the API. The guest is the virtio-blk driver (reporting on COM1): it writes,
flushes and reads back its private copy of the image, and resets when done."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from isovisor.api.client import ApiClient, ClientConfig
from isovisor.host.config import DaemonConfig
from isovisor.host.daemon import Daemon
from isovisor.kvm import Kvm
from tests.devices.virtio.blk_helpers import make_image
from tests.devices.virtio.serial_guests import build_serial_guest

ALIVE = "600df00d"


def _client(daemon: Daemon) -> ApiClient:
    assert daemon.admin is not None
    return ApiClient(ClientConfig(daemon.endpoint, daemon.ca.cert_path, daemon.admin.cert,
                                  daemon.admin.key))


def test_a_vm_with_a_disk_boots_through_the_daemon(tmp_path: Path, kvm: Kvm) -> None:
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: the worker jail needs root (cgroups, uid switch)")
    kernel = build_serial_guest(tmp_path, "blk_driver")
    image = make_image(tmp_path / "data.img", 64)
    config = DaemonConfig(state_dir=tmp_path / "state", listen="127.0.0.1:0",
                          bootstrap_admin="admin")
    daemon = Daemon(config)
    daemon.start()
    try:
        with _client(daemon) as c:
            c.post("/v1/tenants", json={"name": "a"})
            c.put("/v1/tenants/a/images/blk", content=kernel.read_bytes())
            c.put("/v1/tenants/a/images/data", content=image.read_bytes())
            vm = c.post("/v1/tenants/a/vms", json={"name": "d", "kernel": "blk",
                                                   "memoryMiB": 32,
                                                   "disks": [{"image": "data"}]})
            assert vm["state"] == "running"
            out, deadline = b"", time.monotonic() + 120
            while ALIVE.encode() not in out:
                assert time.monotonic() < deadline, out
                out += c.raw("GET", "/v1/tenants/a/vms/d/console",
                             params={"offset": len(out), "wait": 5}).content
            values = out.decode().split()
            # (status, used len) of OUT, FLUSH, IN, GET_ID; then 0: read back == written
            assert values[7:16] == ["00000000", "00000001", "00000000", "00000001",
                                    "00000000", "00000401", "00000000", "00000015",
                                    "00000000"], values
            while c.get("/v1/tenants/a/vms/d")["state"] != "stopped":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            ended = c.get("/v1/tenants/a/vms/d")
            assert ended["lastExitStatus"] == 0 and ended["lastStopReason"] == "the guest reset"
    finally:
        daemon.stop()
