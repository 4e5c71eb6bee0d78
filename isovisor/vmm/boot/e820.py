"""The guest's memory map (e820), derived from GuestMemory's RAM regions.

Low RAM is split the way a PC firmware reports it: usable RAM below the EBDA, the legacy
area [EBDA_START, 1 MiB) reserved (EBDA, VGA, option ROMs, BIOS, and the ACPI tables
isovisor places there), then usable RAM from 1 MiB to the MMIO hole, and RAM above 4 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from isovisor.memory.guest_memory import GuestMemory
from isovisor.memory.layout import EBDA_START, HIGH_MEMORY_START
from isovisor.vmm.boot.errors import BootConfigError


class E820Type(IntEnum):
    """Address range types (ACPI 6.5 §15.3 Table 15.312; Linux asm/e820/types.h)."""

    RAM = 1
    RESERVED = 2
    ACPI = 3  # ACPI reclaimable
    NVS = 4  # ACPI NVS
    UNUSABLE = 5
    PMEM = 7


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size


def low_ram_end(mem: GuestMemory) -> int:
    """End of the RAM region that starts at guest-physical 0 (below the MMIO hole)."""
    for region in mem.regions:
        if region.guest_addr == 0:
            return region.end
    raise BootConfigError("guest memory has no RAM at address 0")  # pragma: no cover


def e820_map(mem: GuestMemory) -> tuple[E820Entry, ...]:
    """The memory map every boot protocol hands the guest, sorted by address."""
    low_end = low_ram_end(mem)
    if low_end <= HIGH_MEMORY_START:  # pragma: no cover - GuestMemory is at least 16 MiB
        raise BootConfigError(f"guest RAM below the MMIO hole ends at {low_end:#x}, under 1 MiB")
    entries = [
        E820Entry(0, EBDA_START, E820Type.RAM),
        E820Entry(EBDA_START, HIGH_MEMORY_START - EBDA_START, E820Type.RESERVED),
        E820Entry(HIGH_MEMORY_START, low_end - HIGH_MEMORY_START, E820Type.RAM),
    ]
    entries.extend(
        E820Entry(r.guest_addr, r.size, E820Type.RAM) for r in mem.regions if r.guest_addr != 0
    )
    return tuple(sorted(entries, key=lambda e: e.addr))
