"""Encoders for the ACPI tables isovisor gives a guest: RSDP, XSDT, FADT, MADT, DSDT.

Each function returns one table's bytes with its checksum filled in; none of them knows
where the tables go in guest memory (the caller passes the addresses one table needs of
another). Section numbers are those of ACPI 6.5.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from isovisor.memory.layout import IOAPIC_BASE, LAPIC_BASE
from isovisor.vmm.acpi.aml import AcpiError

# --- identities (§5.2.6 System Description Table Header) ------------------------------

OEM_ID = b"ISOVSR"  # 6 bytes
OEM_TABLE_ID = b"ISOVISOR"  # 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"ISOV"  # 4 bytes: the "ASL compiler" of our DSDT is aml.py
CREATOR_REVISION = 1

SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")  # §5.2.6 Table 5.4
SDT_HEADER_LEN = 36
SDT_CHECKSUM_OFFSET = 9
assert SDT_HEADER.size == SDT_HEADER_LEN


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with that byte counted as zero) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def _with_checksum(table: bytes, offset: int) -> bytes:
    out = bytearray(table)
    out[offset] = 0
    out[offset] = checksum(out)
    return bytes(out)


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header, then `body`, checksummed."""
    length = SDT_HEADER_LEN + len(body)
    header = SDT_HEADER.pack(signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                             OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    return _with_checksum(header + body, SDT_CHECKSUM_OFFSET)


# --- RSDP (§5.2.5.3) ----------------------------------------------------------------

RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2  # ACPI 2.0+: has Length, XsdtAddress and the extended checksum
RSDP = struct.Struct("<8sB6sBIIQB3x")
RSDP_LEN = 36
RSDP_V1_LEN = 20  # the ACPI 1.0 part the first checksum covers
RSDP_CHECKSUM_OFFSET = 8
RSDP_EXT_CHECKSUM_OFFSET = 32
RSDP_ALIGN = 16  # §5.2.5.1: OSPM scans for it on 16-byte boundaries
assert RSDP.size == RSDP_LEN


def rsdp(xsdt_addr: int) -> bytes:
    """RSDP v2 pointing at the XSDT only (RsdtAddress 0: there is no RSDT)."""
    raw = RSDP.pack(RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION, 0, RSDP_LEN, xsdt_addr, 0)
    raw = _with_checksum(raw[:RSDP_V1_LEN], RSDP_CHECKSUM_OFFSET) + raw[RSDP_V1_LEN:]
    return _with_checksum(raw, RSDP_EXT_CHECKSUM_OFFSET)


# --- XSDT (§5.2.8) ----------------------------------------------------------------------

XSDT_REVISION = 1


def xsdt(entries: Sequence[int]) -> bytes:
    """XSDT: the 64-bit addresses of every table but the DSDT (the FADT points at it)."""
    return sdt(b"XSDT", XSDT_REVISION, b"".join(struct.pack("<Q", a) for a in entries))


# --- FADT (§5.2.9) ----------------------------------------------------------------------

FADT_REVISION = 6
FADT_MINOR_REVISION = 5  # ACPI 6.5
FADT_LEN = 276  # up to and including the Hypervisor Vendor Identity (ACPI 6.0+)

# §5.2.9 Table 5.10 Fixed Feature Flags.
FADT_F_RESET_REG_SUP = 1 << 10
FADT_F_HW_REDUCED_ACPI = 1 << 20
# §5.2.9.3 IA-PC Boot Architecture Flags.
IAPC_LEGACY_DEVICES = 1 << 0  # ISA-port devices exist: COM1, i8042, CMOS RTC
IAPC_8042 = 1 << 1  # an i8042 is present (isovisor's carries the reset line)
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3  # no PCI at all, so no MSI
IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5  # left clear: the CMOS RTC is at 0x70
FADT_IAPC_BOOT_ARCH = (
    IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED
)
FADT_FLAGS = FADT_F_HW_REDUCED_ACPI | FADT_F_RESET_REG_SUP
PM_PROFILE_UNSPECIFIED = 0  # §5.2.9 Preferred_PM_Profile

# §5.2.3.2 Generic Address Structure: space id, bit width, bit offset, access size, address.
GAS = struct.Struct("<BBBBQ")
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1
# Reset through the i8042: writing 0xFE (pulse output line 0) to its command port resets
# the machine, as isovisor's i8042 model implements.
RESET_REG = GAS.pack(GAS_SYSTEM_IO, 8, 0, GAS_ACCESS_BYTE, 0x64)
RESET_VALUE = 0xFE
HYPERVISOR_VENDOR_ID = b"ISOVISOR"  # 8 bytes (§5.2.9 Hypervisor Vendor Identity)

# Field offsets (§5.2.9 Table 5.9).
FADT_PM_PROFILE_OFFSET = 45
FADT_IAPC_BOOT_ARCH_OFFSET = 109
FADT_FLAGS_OFFSET = 112
FADT_RESET_REG_OFFSET = 116
FADT_RESET_VALUE_OFFSET = 128
FADT_MINOR_REVISION_OFFSET = 131
FADT_X_DSDT_OFFSET = 140
FADT_HYPERVISOR_ID_OFFSET = 268


def fadt(dsdt_addr: int) -> bytes:
    """FADT for hardware-reduced ACPI: no PM blocks, GPEs, SCI or FACS; X_DSDT only.

    The sleep control/status registers stay zero (no sleep states); the 32-bit DSDT
    field stays zero because X_DSDT carries the address.
    """
    body = bytearray(FADT_LEN - SDT_HEADER_LEN)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - SDT_HEADER_LEN, *values)

    put(FADT_PM_PROFILE_OFFSET, "<B", PM_PROFILE_UNSPECIFIED)
    put(FADT_IAPC_BOOT_ARCH_OFFSET, "<H", FADT_IAPC_BOOT_ARCH)
    put(FADT_FLAGS_OFFSET, "<I", FADT_FLAGS)
    put(FADT_RESET_REG_OFFSET, "<12s", RESET_REG)
    put(FADT_RESET_VALUE_OFFSET, "<B", RESET_VALUE)
    put(FADT_MINOR_REVISION_OFFSET, "<B", FADT_MINOR_REVISION)
    put(FADT_X_DSDT_OFFSET, "<Q", dsdt_addr)
    put(FADT_HYPERVISOR_ID_OFFSET, "<8s", HYPERVISOR_VENDOR_ID)
    return sdt(b"FACP", FADT_REVISION, bytes(body))


# --- MADT (§5.2.12) ---------------------------------------------------------------------

MADT_REVISION = 5  # ACPI 6.3+: the Local APIC flags include Online Capable (bit 1)
MADT_PCAT_COMPAT = 1 << 0  # §5.2.12 Table 5.20: a dual-8259 is present (KVM's irqchip)

MADT_TYPE_LOCAL_APIC = 0  # §5.2.12.2
MADT_TYPE_IOAPIC = 1  # §5.2.12.3
MADT_TYPE_INT_SRC_OVERRIDE = 2  # §5.2.12.5
MADT_TYPE_LOCAL_APIC_NMI = 4  # §5.2.12.7
LOCAL_APIC = struct.Struct("<BBBBI")
IOAPIC = struct.Struct("<BBBBII")
INT_SRC_OVERRIDE = struct.Struct("<BBBBIH")
LOCAL_APIC_NMI = struct.Struct("<BBBHB")
LOCAL_APIC_ENABLED = 1 << 0

# The IOAPIC id matches what KVM's in-kernel IOAPIC reports in its ID register after
# reset (0); it only has to be unique among IOAPICs (one here).
IOAPIC_ID = 0
IOAPIC_GSI_BASE = 0
ISA_BUS = 0
# MPS INTI flags (§5.2.12.5 Table 5.26): 0 = conforms to the bus (ISA: edge, active high).
MPS_INTI_CONFORMS = 0x0000
MPS_INTI_EDGE_ACTIVE_HIGH = 0x0005  # polarity 01 = high, trigger 01 = edge
PIT_IRQ = 0
PIT_GSI = 2  # the PIT's output is wired to IOAPIC pin 2 on every PC (KVM's too)
ALL_PROCESSORS = 0xFF  # §5.2.12.7: the Local APIC NMI entry applies to every processor
LINT1 = 1

# xAPIC ids are 8 bits and 0xFF is the broadcast id, so ids run 0..254; more vCPUs would
# need Processor Local x2APIC structures, which isovisor does not build.
MAX_XAPIC_VCPUS = 0xFF


def madt(vcpus: int) -> bytes:
    """MADT: a local APIC per vCPU (processor id = APIC id = index), the IOAPIC, the PIT's
    interrupt source override and LINT1 as NMI on every processor."""
    if not 1 <= vcpus <= MAX_XAPIC_VCPUS:
        raise AcpiError(f"the MADT describes 1..{MAX_XAPIC_VCPUS} vCPUs, not {vcpus}")
    parts = [struct.pack("<II", LAPIC_BASE, MADT_PCAT_COMPAT)]
    parts += [
        LOCAL_APIC.pack(MADT_TYPE_LOCAL_APIC, LOCAL_APIC.size, i, i, LOCAL_APIC_ENABLED)
        for i in range(vcpus)
    ]
    parts.append(IOAPIC.pack(MADT_TYPE_IOAPIC, IOAPIC.size, IOAPIC_ID, 0, IOAPIC_BASE,
                             IOAPIC_GSI_BASE))
    parts.append(INT_SRC_OVERRIDE.pack(MADT_TYPE_INT_SRC_OVERRIDE, INT_SRC_OVERRIDE.size,
                                       ISA_BUS, PIT_IRQ, PIT_GSI, MPS_INTI_CONFORMS))
    parts.append(LOCAL_APIC_NMI.pack(MADT_TYPE_LOCAL_APIC_NMI, LOCAL_APIC_NMI.size,
                                     ALL_PROCESSORS, MPS_INTI_EDGE_ACTIVE_HIGH, LINT1))
    return sdt(b"APIC", MADT_REVISION, b"".join(parts))


# --- DSDT (§5.2.11.1) -------------------------------------------------------------------

DSDT_REVISION = 2  # 2 and above: AML integers are 64 bits wide


def dsdt(definition_block: bytes) -> bytes:
    """DSDT: the header, then the AML of the definition block."""
    return sdt(b"DSDT", DSDT_REVISION, definition_block)
