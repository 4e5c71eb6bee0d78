"""The ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) the guest parses, from the inputs the
builder gives them (vCPU count, virtio-mmio slots). Oracles: AcpiError or tables that fit
below 1 MiB, each with a valid checksum and its declared length."""

from __future__ import annotations

from fuzz.data import Data
from isovisor.vmm.acpi import AcpiError, VirtioMmioSlot, build_acpi_tables
from isovisor.vmm.acpi.builder import ACPI_TABLES_END

COVERS = ("acpi:tables",)


def one_input(data: bytes) -> None:
    d = Data(data)
    vcpus = d.u8() if d.flag() else d.u16()
    slots = []
    for _ in range(d.u8() % 12):
        base = 0xD000_0000 + 0x1000 * (d.u8() % 16) if d.flag() else d.u64()
        slots.append(VirtioMmioSlot(base, 0x1000 if d.flag() else d.u32(), d.u8() % 32))
    try:
        tables = build_acpi_tables(vcpus, slots)
    except AcpiError:
        return
    assert tables.base + len(tables.image) <= ACPI_TABLES_END
    for t in tables.tables:
        size = 20 if t.signature == "RSD PTR " else int.from_bytes(t.data[4:8], "little")
        if t.signature == "RSD PTR ":
            assert sum(t.data[:20]) % 256 == 0, "RSDP checksum"
            assert sum(t.data) % 256 == 0, "RSDP extended checksum"
        else:
            assert size == len(t.data), f"{t.signature} length field"
            assert sum(t.data) % 256 == 0, f"{t.signature} checksum"
