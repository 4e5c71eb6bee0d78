"""The guest-physical address map isovisor gives every VM (x86_64)."""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

PAGE_SIZE = 4096

# The 32-bit MMIO hole: devices (virtio-mmio, IOAPIC, local APIC) live here, never RAM.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
IOAPIC_BASE = 0xFEC0_0000
LAPIC_BASE = 0xFEE0_0000
# virtio-mmio windows (issue "Virtual devices") start here, 4 KiB each.
VIRTIO_MMIO_BASE = 0xD000_0000

# Legacy low memory the e820 map reserves (EBDA, VGA, option ROMs, BIOS).
EBDA_START = 0x9_FC00
HIGH_MEMORY_START = 0x10_0000

# Below the EBDA: boot structures the loaders place in guest RAM.
BOOT_GDT_ADDR = 0x500
BOOT_IDT_ADDR = 0x520
PVH_START_INFO_ADDR = 0x6000
PVH_MEMMAP_ADDR = 0x6100
PVH_MODLIST_ADDR = 0x6800
BOOT_PARAMS_ADDR = 0x7000  # "zero page"
PML4_ADDR = 0x9000
PDPTE_ADDR = 0xA000
PDE_ADDR = 0xB000  # four pages: 0xB000..0xF000 map the first 4 GiB with 2 MiB pages
CMDLINE_ADDR = 0x2_0000
CMDLINE_MAX = 0x1_0000  # 64 KiB, the most any boot protocol here takes
ACPI_TABLES_ADDR = 0xE_0000  # reserved by e820; issue "Virtual devices" fills it

# KVM needs three pages for the TSS and one for the identity map on Intel; put them in the
# hole's top, where no RAM or device lives.
KVM_TSS_ADDR = 0xFFFB_D000
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000

MIN_MEMORY = 16 * MiB
MAX_MEMORY = 1024 * GiB


def ram_regions(size: int) -> list[tuple[int, int]]:
    """Guest-physical (start, length) RAM ranges for `size` bytes of RAM around the hole."""
    below = min(size, MMIO_HOLE_START)
    regions = [(0, below)]
    if size > below:
        regions.append((MMIO_HOLE_END, size - below))
    return regions
