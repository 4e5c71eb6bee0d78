"""KVM bindings: ctypes structures and ioctl wrappers. Knows nothing of devices."""

from isovisor.kvm.errors import KvmError, KvmIoctlError, KvmUnavailableError
from isovisor.kvm.system import CpuidEntry, Kvm, open_kvm
from isovisor.kvm.vcpu import VcpuFd
from isovisor.kvm.vm import VmFd

__all__ = [
    "CpuidEntry",
    "Kvm",
    "KvmError",
    "KvmIoctlError",
    "KvmUnavailableError",
    "VcpuFd",
    "VmFd",
    "open_kvm",
]
