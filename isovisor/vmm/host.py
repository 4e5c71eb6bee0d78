"""What kind of KVM host this is: hardware virtualization (VMX/SVM) or PVM.

On PVM hosts (no VMX/SVM in /proc/cpuinfo, kvm_pvm loaded) guest kernel-mode code is run by
KVM's instruction emulator, which lacks some instructions; isovisor adapts (CPUID masks,
instruction assists) only there, and never on hardware-virtualization hosts.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from pathlib import Path


class HostKind(enum.Enum):
    HARDWARE = "hardware"  # VMX or SVM
    PVM = "pvm"  # pagetable-based virtual machine: guest kernel mode is emulated
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class HostInfo:
    kind: HostKind
    cpu_flags: frozenset[str]

    @property
    def needs_emulator_workarounds(self) -> bool:
        return self.kind is HostKind.PVM


def _cpu_flags(cpuinfo: str) -> frozenset[str]:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def classify(cpuinfo: str, pvm_module_loaded: bool) -> HostInfo:
    flags = _cpu_flags(cpuinfo)
    if "vmx" in flags or "svm" in flags:
        kind = HostKind.HARDWARE
    elif pvm_module_loaded:
        kind = HostKind.PVM
    else:
        kind = HostKind.UNKNOWN
    return HostInfo(kind, flags)


@functools.cache
def detect() -> HostInfo:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return classify(cpuinfo, Path("/sys/module/kvm_pvm").exists())
