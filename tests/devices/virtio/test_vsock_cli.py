"""`isovisor run --vsock cid=N,uds=PATH`: option syntax, clear errors, and the builder's
wiring (one virtio-vsock slot after the other devices, in the ACPI tables; the listening
socket exists while the VM does and is removed at teardown)."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from isovisor.cli.vsock_option import vsock_option
from isovisor.devices.virtio.vsock import VsockSpec
from isovisor.kvm import Kvm
from isovisor.vmm.builder import Machine, SerialSpec, VmSpec
from isovisor.vmm.vm import VmError
from tests.conftest import REPO


def test_syntax() -> None:
    assert vsock_option("cid=3,uds=/run/v.sock") == VsockSpec(3, Path("/run/v.sock"))
    assert vsock_option("uds=v.sock,cid=42") == VsockSpec(42, Path("v.sock"))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "expected cid=N,uds=PATH"),
        ("cid=3", "expected cid=N,uds=PATH"),
        ("uds=/x", "expected cid=N,uds=PATH"),
        ("cid=3,uds=/x,cid=4", "expected cid=N,uds=PATH"),
        ("cid=3,uds=", "expected cid=N,uds=PATH"),
        ("cid=3,path=/x", "expected cid=N,uds=PATH"),
        ("cid=-3,uds=/x", "whole number"),
        ("cid=0x10,uds=/x", "whole number"),
    ],
)
def test_bad_syntax(text: str, why: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        vsock_option(text)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isovisor.cli.main", "run", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )


def test_cli_bad_syntax_is_a_usage_error() -> None:
    r = run_cli("--kernel", "/nonexistent", "--vsock", "cid=3")
    assert r.returncode == 2 and "expected cid=N,uds=PATH" in r.stderr


@pytest.mark.kvm
def test_cli_jailed_run_takes_vsock_and_cleans_up(
    kvm: Kvm, tmp_path: Path, built_guests: dict[str, Path]
) -> None:
    """--vsock works in the jailed worker (the default): the CLI, its host side, binds
    the socket and removes it when the VM ends (test_jailed_guests.py has a guest using
    it); a path that exists already is refused and left alone, as before."""
    from tests.worker.conftest import require_root

    require_root()
    r = run_cli("--kernel", str(built_guests["hello"]), "--memory", "32M", "--serial", "none",
                "--rng", "--vsock", f"cid=3,uds={tmp_path}/v.sock", "--timeout", "30")
    assert r.returncode == 0 and "guest reset" in r.stderr, r.stderr
    assert not (tmp_path / "v.sock").exists()
    (tmp_path / "taken").write_text("")
    r = run_cli("--kernel", str(built_guests["hello"]), "--memory", "32M",
                "--vsock", f"cid=3,uds={tmp_path}/taken")
    assert r.returncode == 1 and "already exists" in r.stderr, r.stderr
    assert (tmp_path / "taken").read_text() == ""


@pytest.mark.kvm
def test_cli_reserved_cid_is_a_clear_error(
    kvm: Kvm, tmp_path: Path, built_guests: dict[str, Path]
) -> None:
    r = run_cli("--kernel", str(built_guests["hello"]), "--memory", "32M", "--serial", "none",
                "--no-jail", "--vsock", f"cid=2,uds={tmp_path}/v.sock")
    assert r.returncode == 1, r.stderr
    assert "vsock CID 2 is reserved" in r.stderr


@pytest.mark.kvm
def test_cli_run_with_vsock_cleans_up(
    kvm: Kvm, tmp_path: Path, built_guests: dict[str, Path]
) -> None:
    r = run_cli("--kernel", str(built_guests["hello"]), "--memory", "32M", "--serial", "none",
                "--no-jail", "--rng", "--vsock", f"cid=3,uds={tmp_path}/v.sock",
                "--timeout", "60")
    assert "isovisor:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "v.sock").exists()


@pytest.mark.kvm
def test_machine_puts_vsock_last_and_in_acpi(
    kvm: Kvm, tmp_path: Path, built_guests: dict[str, Path]
) -> None:
    uds = tmp_path / "v.sock"
    spec = VmSpec(kernel=built_guests["hello"], memory=32 << 20, rng=True,
                  serial=SerialSpec(target="none"), vsock=VsockSpec(7, uds))
    m = Machine(spec, kvm)
    try:
        assert len(m.virtio) == 2 and m.vsock is not None
        assert int.from_bytes(m.vm.mmio.read(0xD000_1008, 4), "little") == 19  # slot 1
        assert m.vm.mmio.read(0xD000_1100, 8) == (7).to_bytes(8, "little")  # guest_cid
        assert len(m.virtio_slots) == 2
        acpi = m.vm.mem.read_exact(0xE0000, 0x2000)
        assert acpi.count(b"LNRO0005") == 2
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(uds))  # the listener is up before the guest driver is
    finally:
        m.close()
    assert not uds.exists()


@pytest.mark.kvm
def test_machine_refuses_a_taken_path(
    kvm: Kvm, tmp_path: Path, built_guests: dict[str, Path]
) -> None:
    (tmp_path / "v.sock").write_text("")
    spec = VmSpec(kernel=built_guests["hello"], memory=32 << 20,
                  serial=SerialSpec(target="none"), vsock=VsockSpec(3, tmp_path / "v.sock"))
    with pytest.raises(VmError, match="already exists"):
        Machine(spec, kvm)
    assert (tmp_path / "v.sock").read_text() == ""  # not ours: left alone
