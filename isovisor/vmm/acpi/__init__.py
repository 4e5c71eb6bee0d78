"""ACPI tables per VM, encoded by hand: RSDP, XSDT, FADT (hardware-reduced), MADT, DSDT.

`aml` encodes AML terms and resource descriptors, `tables` the fixed-layout tables, and
`builder` decides what a VM's tables describe and writes them into guest RAM.
"""

from __future__ import annotations

from isovisor.vmm.acpi.aml import AcpiError, AmlError
from isovisor.vmm.acpi.builder import (
    AcpiTable,
    AcpiTables,
    VirtioMmioSlot,
    build_acpi_tables,
    write_acpi_tables,
)

__all__ = [
    "AcpiError",
    "AcpiTable",
    "AcpiTables",
    "AmlError",
    "VirtioMmioSlot",
    "build_acpi_tables",
    "write_acpi_tables",
]
