"""Shared fixtures: KVM access (skipped loudly when /dev/kvm is missing) and built guests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.kvm import Kvm, KvmUnavailableError

REPO = Path(__file__).resolve().parent.parent
GUEST_BUILD = REPO / "guests" / "build"
SHARED = REPO.parent / "shared"
TEST_KERNEL = SHARED / "guest-kernels" / "vmlinux-virtio-6.1"
# The test kernel's command line from guest-kernels/README.md: clearcpuid= hides what
# this PVM host's ring 0 would otherwise see despite our CPUID masks (docs/STOCK_LINUX.md).
TEST_KERNEL_CLEARCPUID = (
    "xsave,avx,avx2,avx512f,popcnt,smap,smep,umip,pku,fsgsbase,rdpid,la57,bmi1,bmi2,movbe,"
    "erms,fsrm,aes,pclmulqdq,sha_ni,adx,rdseed,rdrand,f16c,fma"
)
TEST_KERNEL_CMDLINE = (
    f"console=ttyS0 root=/dev/vda rw ip=dhcp panic=-1 clearcpuid={TEST_KERNEL_CLEARCPUID}"
)

NO_KVM_REASON = (
    "LOUD SKIP: /dev/kvm is missing or unusable on this machine, so KVM tests cannot run "
    "(.ci/run fails unless ISOVISOR_ALLOW_NO_KVM=1)"
)


def kvm_usable() -> str | None:
    """None when KVM works here, else why not."""
    try:
        Kvm().close()
    except KvmUnavailableError as exc:
        return str(exc)
    return None


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    why = kvm_usable()
    if why is not None:
        pytest.skip(f"{NO_KVM_REASON}: {why}")
    k = Kvm()
    yield k
    k.close()


@pytest.fixture(scope="session")
def built_guests() -> dict[str, Path]:
    """Build guests/*.asm (make guests) once per session; name -> ELF path."""
    if shutil.which("nasm") is None:
        pytest.fail("nasm is missing: run `make setup` (the Makefile installs it)")
    subprocess.run(["make", "-s", "-C", str(REPO), "guests"], check=True)
    return {p.stem: p for p in sorted(GUEST_BUILD.glob("*.elf"))}


def pytest_report_header() -> list[str]:
    why = kvm_usable()
    return [f"kvm: {'usable' if why is None else 'UNAVAILABLE - ' + why}",
            f"isovisor env: ISOVISOR_ALLOW_NO_KVM={os.environ.get('ISOVISOR_ALLOW_NO_KVM', '0')}"]
