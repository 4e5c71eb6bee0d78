"""The ctypes mirrors match the kernel ABI, checked against the C compiler when present."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from isovisor.kvm import constants as c
from isovisor.kvm import structs as s

C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/kvm.h>
int main(void) {
  printf("%zu %zu %zu %zu %zu %zu %zu\n", sizeof(struct kvm_regs), sizeof(struct kvm_sregs),
         sizeof(struct kvm_fpu), sizeof(struct kvm_vcpu_events), sizeof(struct kvm_pit_state2),
         sizeof(struct kvm_ioeventfd), offsetof(struct kvm_run, kvm_valid_regs));
  printf("%lx %lx %lx %lx %lx %lx\n", (unsigned long)KVM_RUN, (unsigned long)KVM_SET_CPUID2,
         (unsigned long)KVM_GET_VCPU_EVENTS, (unsigned long)KVM_SET_USER_MEMORY_REGION,
         (unsigned long)KVM_IOEVENTFD, (unsigned long)KVM_GET_MSRS);
  return 0;
}
"""


def test_sizes_match_abi() -> None:
    assert ctypes.sizeof(s.kvm_regs) == 144
    assert ctypes.sizeof(s.kvm_sregs) == 312
    assert s.kvm_run.exit.offset == 32
    assert s.kvm_run.kvm_valid_regs.offset == 32 + 256


@pytest.mark.skipif(
    shutil.which("cc") is None or not Path("/usr/include/linux/kvm.h").exists(),
    reason="no C compiler or kernel headers to cross-check against",
)
def test_layout_and_ioctl_numbers_match_kernel_headers(tmp_path: Path) -> None:
    src = tmp_path / "abi.c"
    src.write_text(C_PROGRAM)
    exe = tmp_path / "abi"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    sizes, numbers = out.splitlines()
    assert [int(x) for x in sizes.split()] == [
        ctypes.sizeof(s.kvm_regs), ctypes.sizeof(s.kvm_sregs), ctypes.sizeof(s.kvm_fpu),
        ctypes.sizeof(s.kvm_vcpu_events), ctypes.sizeof(s.kvm_pit_state2),
        ctypes.sizeof(s.kvm_ioeventfd), s.kvm_run.kvm_valid_regs.offset,
    ]
    assert [int(x, 16) for x in numbers.split()] == [
        c.KVM_RUN, c.KVM_SET_CPUID2, c.KVM_GET_VCPU_EVENTS, c.KVM_SET_USER_MEMORY_REGION,
        c.KVM_IOEVENTFD, c.KVM_GET_MSRS,
    ]
