"""/dev/kvm probing: capabilities, clear errors, ioctl errors naming the ioctl and errno."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from isovisor.kvm import Kvm, KvmIoctlError, KvmUnavailableError, VmFd
from isovisor.kvm import constants as c


def test_missing_device_is_one_clear_sentence(tmp_path: Path) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist: this host has no KVM"):
        Kvm(str(tmp_path / "kvm"))


def test_inaccessible_device_names_the_uid(tmp_path: Path) -> None:
    if os.getuid() == 0:
        # root ignores file modes; a directory cannot be opened O_RDWR either way
        with pytest.raises(KvmUnavailableError, match="cannot be opened"):
            Kvm(str(tmp_path))
        return
    f = tmp_path / "kvm"
    f.write_text("")
    f.chmod(0)
    with pytest.raises(KvmUnavailableError, match="not accessible"):
        Kvm(str(f))


def test_not_a_kvm_device_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KvmUnavailableError):
        Kvm("/dev/null")


def test_cli_without_kvm_prints_one_sentence_no_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, ISOVISOR_KVM_DEVICE=str(tmp_path / "nokvm"))
    out = subprocess.run(
        [sys.executable, "-m", "isovisor.cli.main", "run", "--kernel", "/dev/null"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "does not exist: this host has no KVM" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_capabilities_probed(kvm: Kvm) -> None:
    caps = kvm.capabilities()
    for cap in c.REQUIRED_CAPS:
        assert caps[cap.name] > 0, cap.name
    assert kvm.max_vcpus >= 1
    leaves = {e.function for e in kvm.supported_cpuid()}
    assert {0, 1, 0x8000_0000} <= leaves
    assert 0x10 in kvm.msr_index_list()  # IA32_TSC


def test_failed_ioctl_names_ioctl_and_errno(kvm: Kvm) -> None:
    vm = VmFd(kvm.create_vm())
    try:
        vm.create_irqchip()
        with pytest.raises(KvmIoctlError) as info:
            vm.create_irqchip()  # a second irqchip is refused by KVM
        assert info.value.ioctl_name == "KVM_CREATE_IRQCHIP"
        assert "KVM_CREATE_IRQCHIP failed: E" in str(info.value)
        with pytest.raises(KvmIoctlError, match=r"KVM_SET_USER_MEMORY_REGION failed: EINVAL"):
            vm.set_user_memory_region(0, 0x1000, 4095, 0)  # size not page aligned
    finally:
        vm.close()
