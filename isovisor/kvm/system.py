"""The /dev/kvm system handle: API version, capabilities, supported CPUID and MSRs."""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from isovisor.kvm import constants as c
from isovisor.kvm import structs as s
from isovisor.kvm.errors import KvmIoctlError, KvmUnavailableError
from isovisor.kvm.ioctl import ioctl

KVM_DEVICE = "/dev/kvm"
# KVM_GET_SUPPORTED_CPUID returns E2BIG when the buffer is too small; this is a bound on
# how far we grow it, not a guess at the answer.
_MAX_CPUID_ENTRIES = 1024
_MAX_MSR_INDICES = 4096


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf/subleaf as KVM reports or accepts it."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def cpuid_to_struct(entries: list[CpuidEntry]) -> ctypes.Structure:
    class _Cpuid2(ctypes.Structure):
        _fields_ = [
            ("nent", ctypes.c_uint32),
            ("padding", ctypes.c_uint32),
            ("entries", s.kvm_cpuid_entry2 * max(len(entries), 1)),
        ]

    buf = _Cpuid2()
    buf.nent = len(entries)
    for i, e in enumerate(entries):
        dst = buf.entries[i]
        dst.function, dst.index, dst.flags = e.function, e.index, e.flags
        dst.eax, dst.ebx, dst.ecx, dst.edx = e.eax, e.ebx, e.ecx, e.edx
    return buf


def cpuid_from_struct(buf: ctypes.Structure) -> list[CpuidEntry]:
    return [
        CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
        for e in buf.entries[: buf.nent]
    ]


class Kvm:
    """An open /dev/kvm. Construction checks the API version and required capabilities."""

    def __init__(self, path: str = KVM_DEVICE) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{path} does not exist: this host has no KVM (load kvm_intel/kvm_amd, "
                "or run on a host with hardware virtualization)"
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"{path} is not accessible to uid {os.getuid()}: run as root or add "
                "this user to the kvm group"
            ) from None
        except OSError as exc:
            raise KvmUnavailableError(f"{path} cannot be opened: {exc.strerror}") from None
        try:
            try:
                version = ioctl(self.fd, c.KVM_GET_API_VERSION)
            except KvmIoctlError as exc:
                raise KvmUnavailableError(
                    f"{path} is not a KVM device (KVM_GET_API_VERSION: {exc.errno_name})"
                ) from None
            if version != c.KVM_API_VERSION:
                raise KvmUnavailableError(
                    f"{path} speaks KVM API {version}, isovisor needs {c.KVM_API_VERSION}"
                )
            missing = [cap.name for cap in c.REQUIRED_CAPS if not self.check_extension(cap)]
            if missing:
                raise KvmUnavailableError(
                    f"{path} lacks capabilities isovisor needs: {', '.join(missing)}"
                )
            self.vcpu_mmap_size = ioctl(self.fd, c.KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, c.KVM_CHECK_EXTENSION, int(cap))

    def capabilities(self) -> dict[str, int]:
        """Every capability isovisor knows of, with the value KVM reports."""
        return {cap.name: self.check_extension(cap) for cap in c.Cap}

    @property
    def max_vcpus(self) -> int:
        return self.check_extension(c.Cap.MAX_VCPUS) or self.check_extension(c.Cap.NR_VCPUS) or 4

    def supported_cpuid(self) -> list[CpuidEntry]:
        n = 64
        while True:
            buf = cpuid_to_struct([CpuidEntry(0, 0, 0, 0, 0, 0, 0)] * n)
            buf.nent = n
            try:
                ioctl(self.fd, c.KVM_GET_SUPPORTED_CPUID, buf)
            except KvmIoctlError as exc:
                if exc.errno == errno.E2BIG and n < _MAX_CPUID_ENTRIES:
                    n *= 2
                    continue
                raise
            return cpuid_from_struct(buf)

    def msr_index_list(self) -> list[int]:
        n = 256
        while True:

            class _List(ctypes.Structure):
                _fields_ = [("nmsrs", ctypes.c_uint32), ("indices", ctypes.c_uint32 * n)]

            buf = _List()
            buf.nmsrs = n
            try:
                ioctl(self.fd, c.KVM_GET_MSR_INDEX_LIST, buf)
            except KvmIoctlError as exc:
                if exc.errno == errno.E2BIG and n < _MAX_MSR_INDICES:
                    n *= 2
                    continue
                raise
            return list(buf.indices[: buf.nmsrs])

    def create_vm(self) -> int:
        """Create a VM; returns its fd (wrap it in kvm.vm.VmFd)."""
        return ioctl(self.fd, c.KVM_CREATE_VM, 0)


def open_kvm(path: str = KVM_DEVICE) -> Kvm:
    return Kvm(path)
