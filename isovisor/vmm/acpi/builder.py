"""The ACPI tables of one VM: what they describe, where they go, and writing them.

`build_acpi_tables` is pure (same inputs, same bytes); `write_acpi_tables` copies its image
into guest RAM through `GuestMemory.write_all` and returns the RSDP's address, which the
boot loaders pass on (boot_params.acpi_rsdp_addr, hvm_start_info.rsdp_paddr).

Layout, from `ACPI_TABLES_ADDR` (0xE0000, inside the legacy area the e820 map reserves):
the RSDP first (16-byte aligned, where a scan of 0xE0000-0xFFFFF also finds it), then the
XSDT, FADT, MADT and DSDT, each 8-byte aligned, all below 1 MiB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from isovisor.memory.guest_memory import GuestMemory
from isovisor.memory.layout import ACPI_TABLES_ADDR, HIGH_MEMORY_START
from isovisor.vmm.acpi import aml
from isovisor.vmm.acpi.aml import AcpiError
from isovisor.vmm.acpi.tables import RSDP_ALIGN, dsdt, fadt, madt, rsdp, xsdt

TABLE_ALIGN = 8
ACPI_TABLES_END = HIGH_MEMORY_START  # the reserved legacy area ends at 1 MiB

# Legacy devices isovisor's machine always has (devices/legacy).
COM1_PORT = 0x3F8
COM1_PORT_COUNT = 8
COM1_IRQ = 4
RTC_PORT = 0x70
RTC_PORT_COUNT = 2  # the RTC model raises no interrupt, so its _CRS names no IRQ
STA_PRESENT_ENABLED_SHOWN_FUNCTIONING = 0x0F  # _STA bits 0-3 (ACPI 6.5 §6.3.7)

# virtio-mmio: Linux's virtio_mmio driver binds to this _HID (drivers/virtio/virtio_mmio.c).
VIRTIO_MMIO_HID = "LNRO0005"
# GSIs 0-15 are the ISA IRQs (identity mapped, the PIT's overridden to 2); KVM's IOAPIC
# has 24 pins, so virtio-mmio devices take 16-23, one each (edge interrupts do not share).
VIRTIO_GSI_FIRST = 16
IOAPIC_PINS = 24
_U32_LIMIT = 1 << 32


@dataclass(frozen=True)
class VirtioMmioSlot:
    base: int  # guest-physical base of the device's MMIO window
    size: int  # 0x1000
    gsi: int  # IOAPIC pin (16..23 here)


@dataclass(frozen=True)
class AcpiTable:
    signature: str  # "RSD PTR " for the RSDP
    addr: int
    data: bytes


@dataclass(frozen=True)
class AcpiTables:
    """Every table at its guest-physical address, and the image holding them all."""

    base: int
    rsdp_addr: int
    tables: tuple[AcpiTable, ...]  # in address order
    image: bytes  # the bytes from `base`, zero between tables

    def table(self, signature: str) -> AcpiTable:
        for t in self.tables:
            if t.signature == signature:
                return t
        raise KeyError(signature)


def _check_slots(virtio: Sequence[VirtioMmioSlot]) -> None:
    windows: list[tuple[int, int]] = []
    gsis: set[int] = set()
    for slot in virtio:
        if slot.size <= 0 or slot.base < 0 or slot.base + slot.size > _U32_LIMIT:
            raise AcpiError(f"virtio-mmio window {slot.base:#x}+{slot.size:#x} must be "
                            "non-empty and below 4 GiB")
        if not VIRTIO_GSI_FIRST <= slot.gsi < IOAPIC_PINS:
            raise AcpiError(f"virtio-mmio GSI {slot.gsi} is outside "
                            f"{VIRTIO_GSI_FIRST}..{IOAPIC_PINS - 1}")
        if slot.gsi in gsis:
            raise AcpiError(f"virtio-mmio GSI {slot.gsi} is given to two devices")
        for start, end in windows:
            if slot.base < end and start < slot.base + slot.size:
                raise AcpiError(f"virtio-mmio window at {slot.base:#x} overlaps the one "
                                f"at {start:#x}")
        gsis.add(slot.gsi)
        windows.append((slot.base, slot.base + slot.size))


def _sta_present() -> bytes:
    return aml.method("_STA", aml.return_(aml.integer(STA_PRESENT_ENABLED_SHOWN_FUNCTIONING)))


def com1_device() -> bytes:
    return aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id_const("PNP0501")),  # 16550A-compatible UART
        aml.name("_UID", aml.integer(1)),
        _sta_present(),
        aml.name("_CRS", aml.resource_template(
            aml.io_port(COM1_PORT, COM1_PORT_COUNT),
            aml.irq_no_flags(COM1_IRQ),
        )),
    )


def rtc_device() -> bytes:
    return aml.device(
        "RTC",
        aml.name("_HID", aml.eisa_id_const("PNP0B00")),  # AT-compatible CMOS RTC
        aml.name("_CRS", aml.resource_template(aml.io_port(RTC_PORT, RTC_PORT_COUNT))),
    )


def virtio_device(index: int, slot: VirtioMmioSlot) -> bytes:
    return aml.device(
        f"VR{index:02d}",
        aml.name("_HID", aml.string(VIRTIO_MMIO_HID)),
        aml.name("_UID", aml.integer(index)),
        aml.name("_CCA", aml.ONE),  # cache-coherent DMA
        aml.name("_CRS", aml.resource_template(
            aml.memory32_fixed(slot.base, slot.size, writable=True),
            aml.interrupt(slot.gsi, consumer=True, edge=True, active_low=False, shared=False),
        )),
    )


def dsdt_aml(virtio: Sequence[VirtioMmioSlot]) -> bytes:
    """The DSDT's definition block: \\_SB with COM1, the RTC and each virtio-mmio device."""
    _check_slots(virtio)
    devices = [virtio_device(i, slot) for i, slot in enumerate(virtio)]
    return aml.scope("\\_SB", com1_device(), rtc_device(), *devices)


def _align(addr: int, alignment: int) -> int:
    return -(-addr // alignment) * alignment


def build_acpi_tables(
    vcpus: int, virtio: Sequence[VirtioMmioSlot], base: int = ACPI_TABLES_ADDR
) -> AcpiTables:
    """Lay out and encode every table from `base`; raise AcpiError if they pass 1 MiB."""
    if base % RSDP_ALIGN:
        raise AcpiError(f"the RSDP address {base:#x} is not {RSDP_ALIGN}-byte aligned")
    dsdt_data = dsdt(dsdt_aml(virtio))
    madt_data = madt(vcpus)
    # Sizes first (only the DSDT and MADT vary), then the addresses the tables hold.
    xsdt_addr = _align(base + len(rsdp(0)), TABLE_ALIGN)
    fadt_addr = _align(xsdt_addr + len(xsdt([0, 0])), TABLE_ALIGN)
    madt_addr = _align(fadt_addr + len(fadt(0)), TABLE_ALIGN)
    dsdt_addr = _align(madt_addr + len(madt_data), TABLE_ALIGN)
    end = dsdt_addr + len(dsdt_data)
    if end > ACPI_TABLES_END:
        raise AcpiError(f"the ACPI tables need {end - base} bytes from {base:#x}, past "
                        f"{ACPI_TABLES_END:#x}: only {ACPI_TABLES_END - base} bytes fit")
    tables = (
        AcpiTable("RSD PTR ", base, rsdp(xsdt_addr)),
        AcpiTable("XSDT", xsdt_addr, xsdt([fadt_addr, madt_addr])),
        AcpiTable("FACP", fadt_addr, fadt(dsdt_addr)),
        AcpiTable("APIC", madt_addr, madt_data),
        AcpiTable("DSDT", dsdt_addr, dsdt_data),
    )
    image = bytearray(end - base)
    for t in tables:
        image[t.addr - base : t.addr - base + len(t.data)] = t.data
    return AcpiTables(base, base, tables, bytes(image))


def write_acpi_tables(mem: GuestMemory, vcpus: int, virtio: Sequence[VirtioMmioSlot]) -> int:
    """Write all tables into guest RAM at memory.layout.ACPI_TABLES_ADDR (0xE0000, inside the
    e820-reserved legacy area below 1 MiB; 128 KiB max up to 0x100000); return the RSDP
    address."""
    built = build_acpi_tables(vcpus, virtio)
    mem.write_all(built.base, built.image)
    return built.rsdp_addr
