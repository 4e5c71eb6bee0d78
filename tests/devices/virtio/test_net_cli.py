"""`isovisor run --net ...`: usage errors, clear errors for a missing TAP, and the builder's
wiring (one virtio-net slot per NIC after rng and the disks; the TAP closed on teardown)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from isovisor.devices.virtio.net import VirtioNet
from isovisor.devices.virtio.net_spec import NetSpec
from isovisor.kvm import Kvm
from isovisor.vmm.builder import Machine, SerialSpec, VmSpec
from isovisor.vmm.vm import VmError
from tests.conftest import REPO
from tests.devices.virtio.netns import NetNs


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isovisor.cli.main", "run", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def test_cli_rejects_bad_syntax_as_usage_error() -> None:
    r = run_cli("--kernel", "/nonexistent", "--net", "tap=t0,speed=10")
    assert r.returncode == 2 and "'speed=10' is not one of" in r.stderr
    r = run_cli("--kernel", "/nonexistent", "--net", "tap=t0,mac=01:00:00:00:00:01")
    assert r.returncode == 2 and "multicast" in r.stderr


@pytest.mark.kvm
def test_cli_jailed_run_takes_a_tap(kvm: Kvm, built_guests: dict[str, Path]) -> None:
    """--net works in the jailed worker (the default): the CLI, its host side, attaches
    the TAP in its own network namespace (test_jailed_guests.py has a guest using it);
    a missing TAP is named as before. nsenter switches only the network namespace (`ip
    netns exec` would remount /sys and hide the cgroup hierarchies the jail needs)."""
    from tests.worker.conftest import require_root

    require_root()
    with NetNs() as ns:
        ns.add_tap("isvtap0")
        enter = ns.nsenter_argv(sys.executable, "-m", "isovisor.cli.main", "run", "--kernel",
                                str(built_guests["hello"]), "--memory", "32M", "--serial",
                                "none", "--timeout", "30")
        r = subprocess.run([*enter, "--net", "tap=isvtap0"], cwd=REPO, capture_output=True,
                           text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 0 and "guest reset" in r.stderr, r.stderr
        ns.open_tap("isvtap0").close()  # the worker's TAP was closed: free again
        r = subprocess.run([*enter, "--net", "tap=isvnothere"], cwd=REPO,
                           capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr
    assert "isovisor: TAP isvnothere does not exist" in r.stderr


@pytest.mark.kvm
def test_cli_missing_tap_is_named(kvm: Kvm, tmp_path: Path) -> None:
    kernel = tmp_path / "k.bin"
    kernel.write_bytes(b"\0" * 64)
    with NetNs() as ns:  # a namespace where the TAP surely does not exist
        r = subprocess.run(
            ns.argv(sys.executable, "-m", "isovisor.cli.main", "run", "--no-jail",
                    "--kernel", str(kernel), "--net", "tap=isvnothere"),
            cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
    assert r.returncode == 1, r.stderr
    assert "isovisor: TAP isvnothere does not exist" in r.stderr


@pytest.mark.kvm
def test_machine_wires_nics_after_rng(kvm: Kvm, built_guests: dict[str, Path]) -> None:
    with NetNs() as ns:
        ns.add_tap("isvtap0")
        ns.add_tap("isvtap1")
        spec = VmSpec(
            kernel=built_guests["hello"], memory=32 << 20, rng=True,
            serial=SerialSpec(target="none"),
            nets=(NetSpec("isvtap0", mac="02:00:00:00:00:0a"), NetSpec("isvtap1")),
        )
        m = ns.call(lambda: Machine(spec, kvm))
        try:
            mmio = m.vm.mmio
            ids = [int.from_bytes(mmio.read(0xD000_0008 + 0x1000 * i, 4), "little")
                   for i in range(3)]
            assert ids == [4, 1, 1]  # rng, then the NICs in order
            assert mmio.read(0xD000_1100, 6) == bytes.fromhex("02000000000a")  # config MAC
            assert all(isinstance(n, VirtioNet) for n in m.nets)
            acpi = m.vm.mem.read_exact(0xE0000, 0x2000)
            assert acpi.count(b"LNRO0005") == 3
            taps = [n.backend for n in m.nets]
        finally:
            m.close()
        assert all(t.closed for t in taps)  # type: ignore[attr-defined]
        ns.open_tap("isvtap0").close()  # free again: not busy


@pytest.mark.kvm
def test_machine_refuses_a_missing_tap_cleanly(kvm: Kvm, built_guests: dict[str, Path]) -> None:
    spec = VmSpec(kernel=built_guests["hello"], memory=32 << 20,
                  serial=SerialSpec(target="none"), nets=(NetSpec("isvnothere"),))
    with NetNs() as ns, pytest.raises(VmError, match="TAP isvnothere does not exist"):
        ns.call(lambda: Machine(spec, kvm))
