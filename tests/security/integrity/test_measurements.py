"""The host measurements read the kernel's own files: on this host they agree with what
the kernel reports elsewhere; below a test root a missing file is measured as absent,
never skipped."""

from __future__ import annotations

import os
from pathlib import Path

from isovisor.security.integrity.measurements import ABSENT, collect, read_value


def test_this_hosts_values() -> None:
    got = {m.name: m.value for m in collect()}
    assert got["kernel.release"] == os.uname().release
    assert got["kernel.cmdline"] == Path("/proc/cmdline").read_text().strip()
    assert got["kernel.randomize_va_space"] in ("0", "1", "2")
    vulns = sorted(os.listdir("/sys/devices/system/cpu/vulnerabilities"))
    assert [n for n in got if n.startswith("cpu.vulnerability.")] == [
        f"cpu.vulnerability.{v}" for v in vulns]
    if Path("/sys/module/kvm/parameters/nx_huge_pages").exists():
        assert "kvm.kvm.nx_huge_pages" in got
    assert {"cpu.smt.control", "cpu.smt.active", "kernel.lockdown"} <= got.keys()


def test_missing_sources_are_measured_as_absent(tmp_path: Path) -> None:
    got = {m.name: m.value for m in collect(tmp_path)}
    assert got == {"kernel.release": ABSENT, "kernel.cmdline": ABSENT,
                   "cpu.smt.control": ABSENT, "cpu.smt.active": ABSENT,
                   "kernel.lockdown": ABSENT, "kernel.randomize_va_space": ABSENT}


def test_values_are_bounded_and_never_raise(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"\xff" * (200 * 1024))
    value = read_value(big)
    assert len(value) <= 4 * 64 * 1024  # 64 KiB read, each byte at most 4 characters
    assert read_value(tmp_path).startswith("<unreadable: ")  # a directory
