"""load_kernel: the entry point of the boot loaders.

Picks the protocol from the image (or checks the one asked for), loads the kernel, command
line and initrd into guest RAM, builds the boot structures, and says where to start.

Auto mode: an ELF with a PVH note boots via PVH; an ELF64 without one via the Linux 64-bit
protocol (vmlinux); an image with the "HdrS" setup header via the Linux 64-bit protocol
(bzImage). Every image is untrusted: anything malformed raises BootImageError.
"""

from __future__ import annotations

from typing import Literal

from isovisor.memory.guest_memory import GuestMemory
from isovisor.vmm.boot.elf import ElfClass, is_elf, parse_elf
from isovisor.vmm.boot.errors import BootConfigError, BootImageError
from isovisor.vmm.boot.linux import is_bzimage, load_bzimage, load_vmlinux
from isovisor.vmm.boot.plan import BootEntry
from isovisor.vmm.boot.pvh import load_pvh, pvh_entry

__all__ = ["BootEntry", "load_kernel"]

RSDP_SIZE = 36  # ACPI 6.5 §5.2.5.3: the RSDP (revision 2) is 36 bytes
_PROTOCOLS = ("auto", "pvh", "linux")


def load_kernel(
    mem: GuestMemory,
    kernel: bytes,
    *,
    cmdline: str = "",
    initrd: bytes | None = None,
    protocol: Literal["auto", "pvh", "linux"] = "auto",
    acpi_rsdp: int | None = None,
) -> BootEntry:
    """Load `kernel` into `mem` and return its entry; BootImageError if the image is bad."""
    if protocol not in _PROTOCOLS:
        raise BootConfigError(f"unknown boot protocol {protocol!r} (one of {_PROTOCOLS})")
    if acpi_rsdp is not None and not mem.is_ram(acpi_rsdp, RSDP_SIZE):
        raise BootConfigError(f"ACPI RSDP address {acpi_rsdp:#x} is not in guest RAM")
    # Parse and load from one immutable copy: a caller's bytearray changing under us cannot
    # make what we checked differ from what we write.
    data = memoryview(kernel if isinstance(kernel, bytes) else bytes(kernel)).cast("B")
    initrd = bytes(initrd) if initrd is not None else None

    if is_elf(data):
        elf = parse_elf(data)
        # "linux" never looks at the PVH note: a kernel with both entries boots either way.
        if protocol == "pvh" or (protocol == "auto" and pvh_entry(elf) is not None):
            return load_pvh(mem, elf, data, cmdline=cmdline, initrd=initrd, acpi_rsdp=acpi_rsdp)
        if protocol == "auto" and elf.elf_class is not ElfClass.ELF64:
            raise BootImageError(
                "kernel image: ELF32 without a PVH entry note: neither PVH nor a 64-bit vmlinux"
            )
        return load_vmlinux(mem, elf, data, cmdline=cmdline, initrd=initrd, acpi_rsdp=acpi_rsdp)
    if is_bzimage(data):
        if protocol == "pvh":
            raise BootImageError("kernel image: a bzImage has no PVH entry (boot it with 'linux')")
        return load_bzimage(mem, data, cmdline=cmdline, initrd=initrd, acpi_rsdp=acpi_rsdp)
    raise BootImageError(
        "kernel image: neither an ELF file (\\x7fELF at 0) nor a bzImage ('HdrS' at 0x202)"
    )
