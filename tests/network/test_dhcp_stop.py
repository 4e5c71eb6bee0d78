"""Stopping a dnsmasq does not wait for its zombie to be reaped: a process that exited
has an empty command line, which `dhcp._cmdline` reports as gone (a container's init
reaping slowly cost ~2 s per dnsmasq stop, each VM create and delete with a NIC)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from isovisor.host.network import dhcp


def test_an_exited_unreaped_process_counts_as_gone() -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while b"sleep" not in dhcp._cmdline(child.pid):  # exec'd
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(child.pid, 15)
        while Path(f"/proc/{child.pid}/stat").read_text().split()[2] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert dhcp._cmdline(child.pid) == []  # a zombie, not reaped yet
        start = time.monotonic()
        dhcp._kill(child.pid, timeout=5.0)
        assert time.monotonic() - start < 0.5
    finally:
        child.kill()
        child.wait()
