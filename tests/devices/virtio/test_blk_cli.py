"""`isovisor run --disk ...`: option syntax, clear errors, and the builder's wiring (one
virtio-blk slot per disk, after rng, in order; images closed on teardown)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from isovisor.cli.disk_option import parse_disk_option
from isovisor.devices.ratelimit import BucketSpec
from isovisor.devices.virtio.blk_disk import DiskSpec
from isovisor.kvm import Kvm
from tests.conftest import REPO
from tests.devices.virtio.blk_helpers import make_image


def test_plain_path() -> None:
    assert parse_disk_option("/img/a.raw") == DiskSpec(Path("/img/a.raw"))


def test_flags_and_values() -> None:
    spec = parse_disk_option("d.img,readonly,direct,serial=vol-1,bw=10M,iops=1000")
    assert spec.path == Path("d.img") and spec.readonly and spec.direct
    assert spec.serial == "vol-1"
    assert spec.bandwidth == BucketSpec(1048576, 10485760.0)
    assert spec.ops == BucketSpec(100, 1000.0)
    assert parse_disk_option("d.img,ro").readonly


def test_bursts_and_plain_bytes() -> None:
    spec = parse_disk_option("d.img,bw=65536,bw-burst=1M,iops=5,iops-burst=20")
    assert spec.bandwidth == BucketSpec(6553, 65536.0, 1 << 20)
    assert spec.ops == BucketSpec(1, 5.0, 20)


def test_doubled_comma_is_part_of_the_path() -> None:
    assert parse_disk_option("a,,b.img,readonly") == DiskSpec(Path("a,b.img"), readonly=True)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "expected PATH"),
        (",readonly", "expected PATH"),
        ("d.img,rw", "unknown option 'rw'"),
        ("d.img,readonly,readonly", "given twice"),
        ("d.img,bw=1M,bw=2M", "given twice"),
        ("d.img,bw=fast", "positive size"),
        ("d.img,bw=0", "positive size"),
        ("d.img,iops=-3", "positive integer"),
        ("d.img,iops=1.5", "positive integer"),
        ("d.img,bw-burst=1M", "needs bw="),
        ("d.img,serial=" + "x" * 21, "serial"),
        ("d.img,direct=1", "unknown option"),
    ],
)
def test_bad_syntax(text: str, why: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        parse_disk_option(text)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isovisor.cli.main", "run", *args],
        cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


def test_cli_rejects_bad_syntax_as_usage_error(tmp_path: Path) -> None:
    r = run_cli("--kernel", "/nonexistent", "--disk", f"{tmp_path}/d.img,bogus")
    assert r.returncode == 2 and "unknown option 'bogus'" in r.stderr


@pytest.mark.kvm
def test_cli_jailed_run_takes_disks(
    kvm: Kvm, built_guests: dict[str, Path], tmp_path: Path
) -> None:
    """Disks work in the jailed worker (the default): the host side opens the image
    (test_jailed_guests.py has a guest driving it); a missing one is named as before."""
    from tests.worker.conftest import require_root

    require_root()
    img = make_image(tmp_path / "d.img", 8)
    r = run_cli("--kernel", str(built_guests["hello"]), "--memory", "32M", "--serial", "none",
                "--disk", str(img), "--disk", f"{img},readonly", "--timeout", "30")
    assert "--no-jail" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "in use by another VM" in r.stderr  # the first open holds the exclusive lock
    r = run_cli("--kernel", str(built_guests["hello"]), "--memory", "32M", "--serial", "none",
                "--disk", str(img), "--timeout", "30")
    assert r.returncode == 0 and "guest reset" in r.stderr, r.stderr  # hello resets
    missing = tmp_path / "missing.img"
    r = run_cli("--kernel", str(built_guests["hello"]), "--disk", str(missing))
    assert r.returncode == 1 and f"isovisor: disk {missing} does not exist" in r.stderr


@pytest.mark.kvm
def test_cli_missing_disk_is_named(tmp_path: Path) -> None:
    from tests.conftest import NO_KVM_REASON, kvm_usable

    why = kvm_usable()
    if why is not None:
        pytest.skip(f"{NO_KVM_REASON}: {why}")
    kernel = tmp_path / "k.bin"
    kernel.write_bytes(b"\0" * 64)
    missing = tmp_path / "missing.img"
    r = run_cli("--no-jail", "--kernel", str(kernel), "--disk", str(missing))
    assert r.returncode == 1, r.stderr
    assert f"isovisor: disk {missing} does not exist" in r.stderr


@pytest.mark.kvm
def test_builder_attaches_disks_after_rng_in_order(
    kvm: Kvm, built_guests: dict[str, Path], tmp_path: Path
) -> None:
    from isovisor.devices.virtio.blk import VirtioBlk
    from isovisor.devices.virtio.blk_disk import Disk
    from isovisor.vmm.builder import Machine, SerialSpec, VmSpec

    a, b = make_image(tmp_path / "a.img", 8), make_image(tmp_path / "b.img", 16)
    spec = VmSpec(kernel=built_guests["hello"], memory=32 << 20, serial=SerialSpec(target="none"),
                  rng=True, disks=(DiskSpec(a), DiskSpec(b, readonly=True)))
    m = Machine(spec, kvm)
    try:
        kinds = [t.device.name for t in m.virtio]
        assert kinds == ["virtio-rng", "virtio-blk", "virtio-blk"]
        blks = [t.device for t in m.virtio[1:]]
        assert all(isinstance(d, VirtioBlk) for d in blks)
        assert [d.disk.path for d in m.disks] == [a, b]
        assert [s.base for s in m.virtio_slots] == [0xD0000000, 0xD0001000, 0xD0002000]
        assert m.disks[1].readonly and not m.disks[0].readonly
    finally:
        m.close()
    # Teardown closed the images: the exclusive lock on `a` is free again.
    Disk.open(DiskSpec(a)).close()


@pytest.mark.kvm
def test_builder_names_a_bad_disk(kvm: Kvm, built_guests: dict[str, Path], tmp_path: Path) -> None:
    from isovisor.vmm.builder import Machine, SerialSpec, VmSpec
    from isovisor.vmm.vm import VmError

    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 700)
    with pytest.raises(VmError, match=f"disk {odd} is 700 bytes"):
        Machine(VmSpec(kernel=built_guests["hello"], memory=32 << 20,
                       serial=SerialSpec(target="none"), disks=(DiskSpec(odd),)), kvm)
