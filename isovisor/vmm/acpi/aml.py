"""A small AML encoder: just the terms isovisor's DSDT needs (ACPI 6.5 chapter 20).

Every function returns the encoded bytes of one term; terms nest by passing those bytes
to the enclosing term (`device("COM1", name("_UID", ONE), ...)`). Arguments are checked
here, where they are encoded, so a bad name or an out-of-range value raises `AmlError`
instead of producing a table the guest's interpreter would misread.

Resource descriptors (ACPI 6.5 §6.4) are here too: `resource_template` wraps them in a
Buffer ending with an End Tag whose checksum makes the whole template sum to zero.
"""

from __future__ import annotations

import struct


class AcpiError(Exception):
    """Base of every error raised while building ACPI tables."""


class AmlError(AcpiError):
    """An AML term or resource descriptor was asked for with arguments it cannot encode."""


# --- opcodes (ACPI 6.5 §20.2) --------------------------------------------------------

ZERO_OP = 0x00  # §20.2.3 ConstObj
ONE_OP = 0x01
NAME_OP = 0x08  # §20.2.5.1 DefName
BYTE_PREFIX = 0x0A  # §20.2.3 ComputationalData
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10  # §20.2.5.1 DefScope
BUFFER_OP = 0x11  # §20.2.5.4 DefBuffer
PACKAGE_OP = 0x12  # §20.2.5.4 DefPackage
METHOD_OP = 0x14  # §20.2.5.2 DefMethod
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # §20.2.5.2 DefDevice = ExtOpPrefix 0x82
RETURN_OP = 0xA4  # §20.2.5.3 DefReturn

# --- name strings (ACPI 6.5 §20.2.2) ---------------------------------------------------

ROOT_CHAR = "\\"
PARENT_PREFIX_CHAR = "^"
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
NULL_NAME = 0x00
NAME_SEG_LEN = 4
MAX_MULTI_NAME_SEGS = 255  # SegCount is one byte
_LEAD_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _LEAD_NAME_CHARS | frozenset("0123456789")

# --- PkgLength (ACPI 6.5 §20.2.4) --------------------------------------------------------

PKG_LENGTH_MAX = (1 << 28) - 1  # four bytes: 4 bits in the lead byte + 3 following bytes
_PKG_ONE_BYTE_MAX = 0x3F  # six bits of the lead byte
_PKG_LENGTH_LIMITS = (_PKG_ONE_BYTE_MAX, (1 << 12) - 1, (1 << 20) - 1, PKG_LENGTH_MAX)

# --- method flags (ACPI 6.5 §20.2.5.2 MethodFlags) ------------------------------------

METHOD_MAX_ARGS = 7  # bits 0-2
METHOD_SERIALIZED = 1 << 3  # bit 3
METHOD_SYNC_LEVEL_SHIFT = 4  # bits 4-7
METHOD_MAX_SYNC_LEVEL = 15

MAX_PACKAGE_ELEMENTS = 255  # NumElements is one byte (larger needs VarPackageOp)


def name_seg(seg: str) -> bytes:
    """A NameSeg: a lead char (A-Z or _), up to three name chars, padded with '_' to 4."""
    if not 1 <= len(seg) <= NAME_SEG_LEN:
        raise AmlError(f"AML name segment {seg!r} must be 1 to 4 characters")
    if seg[0] not in _LEAD_NAME_CHARS or any(c not in _NAME_CHARS for c in seg):
        raise AmlError(f"AML name segment {seg!r} has characters outside [A-Z0-9_] "
                       "or starts with a digit")
    return seg.ljust(NAME_SEG_LEN, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: optional root or parent prefixes, then zero or more dotted segments.

    "\\" is the root itself, "_SB" a single segment, "\\_SB.COM1" a rooted dual name,
    "^^FOO" two parents up.
    """
    prefix = b""
    rest = path
    if rest.startswith(ROOT_CHAR):
        prefix, rest = ROOT_CHAR.encode(), rest[1:]
    else:
        while rest.startswith(PARENT_PREFIX_CHAR):
            prefix, rest = prefix + PARENT_PREFIX_CHAR.encode(), rest[1:]
    if not rest:
        if not prefix:
            raise AmlError("an empty AML name needs a root or parent prefix")
        return prefix + bytes([NULL_NAME])
    segs = [name_seg(s) for s in rest.split(".")]
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > MAX_MULTI_NAME_SEGS:
        raise AmlError(f"AML name {path!r} has more than {MAX_MULTI_NAME_SEGS} segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def pkg_length(body_len: int) -> bytes:
    """The PkgLength of a package whose remaining bytes (after PkgLength) number body_len.

    The encoded value counts the PkgLength bytes themselves, so the form is the smallest
    of one to four bytes that can hold body_len plus its own size.
    """
    if body_len < 0:
        raise AmlError(f"negative AML package length {body_len}")
    for nbytes, limit in enumerate(_PKG_LENGTH_LIMITS, start=1):
        total = body_len + nbytes
        if total <= limit:
            break
    else:
        raise AmlError(f"AML package of {body_len} bytes exceeds PkgLength's {PKG_LENGTH_MAX}")
    if nbytes == 1:
        return bytes([total])
    # Lead byte: bits 7-6 = count of following bytes, bits 5-4 zero, bits 3-0 = low nibble.
    lead = ((nbytes - 1) << 6) | (total & 0x0F)
    return bytes([lead]) + (total >> 4).to_bytes(nbytes - 1, "little")


def _package(op: bytes, body: bytes) -> bytes:
    return op + pkg_length(len(body)) + body


# --- data objects (ACPI 6.5 §20.2.3) -------------------------------------------------

ZERO = bytes([ZERO_OP])
ONE = bytes([ONE_OP])

_U64_MAX = (1 << 64) - 1


def _fixed(prefix: int, fmt: str, value: int, what: str) -> bytes:
    try:
        return bytes([prefix]) + struct.pack(fmt, value)
    except struct.error as exc:
        raise AmlError(f"AML {what} constant {value:#x} is out of range") from exc


def byte_const(value: int) -> bytes:
    return _fixed(BYTE_PREFIX, "<B", value, "Byte")


def word_const(value: int) -> bytes:
    return _fixed(WORD_PREFIX, "<H", value, "Word")


def dword_const(value: int) -> bytes:
    return _fixed(DWORD_PREFIX, "<I", value, "DWord")


def qword_const(value: int) -> bytes:
    return _fixed(QWORD_PREFIX, "<Q", value, "QWord")


def integer(value: int) -> bytes:
    """The shortest encoding of an unsigned integer: Zero, One, or a Byte..QWord constant."""
    if not 0 <= value <= _U64_MAX:
        raise AmlError(f"AML integer {value} is outside 0..2**64-1")
    if value == 0:
        return ZERO
    if value == 1:
        return ONE
    if value <= 0xFF:
        return byte_const(value)
    if value <= 0xFFFF:
        return word_const(value)
    if value <= 0xFFFF_FFFF:
        return dword_const(value)
    return qword_const(value)


def string(text: str) -> bytes:
    """A String: ASCII chars 0x01-0x7F, NUL-terminated."""
    if any(not 0x01 <= ord(c) <= 0x7F for c in text):
        raise AmlError(f"AML string {text!r} must hold only ASCII characters 0x01-0x7F")
    return bytes([STRING_PREFIX]) + text.encode("ascii") + b"\x00"


def buffer(data: bytes) -> bytes:
    """Buffer (n) {data}: BufferOp PkgLength BufferSize ByteList."""
    return _package(bytes([BUFFER_OP]), integer(len(data)) + data)


def package(*elements: bytes) -> bytes:
    """Package () {elements}: each element an encoded data object or name."""
    if len(elements) > MAX_PACKAGE_ELEMENTS:
        raise AmlError(f"AML Package of {len(elements)} elements exceeds "
                       f"{MAX_PACKAGE_ELEMENTS}")
    return _package(bytes([PACKAGE_OP]), bytes([len(elements)]) + b"".join(elements))


EISA_ID_LEN = 7  # "PNP0501": three letters, four hex digits
_EISA_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_HEX_DIGITS = frozenset("0123456789ABCDEF")


def eisa_id(text: str) -> int:
    """EISAID("PNP0501"): 5-bit letters and 4 hex digits, stored big-endian (ASL EISAID,
    ACPI 6.5 §19.6).

    The letters sit in bits 30-16 of a big-endian 32-bit value; AML holds it as a little-
    endian DWord, hence the byte swap: EISAID("PNP0501") == 0x0105D041.
    """
    if (
        len(text) != EISA_ID_LEN
        or any(c not in _EISA_LETTERS for c in text[:3])
        or any(c not in _HEX_DIGITS for c in text[3:])
    ):
        raise AmlError(f"EISA id {text!r} must be three capital letters and four hex digits")
    value = 0
    for shift, letter in zip((26, 21, 16), text[:3], strict=True):
        value |= (ord(letter) - 0x40) << shift
    value |= int(text[3:], 16)
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def eisa_id_const(text: str) -> bytes:
    """An EISA id as AML always holds it: a DWord constant."""
    return dword_const(eisa_id(text))


# --- named objects and control (ACPI 6.5 §20.2.5) -------------------------------------

def name(path: str, value: bytes) -> bytes:
    """Name (path, value)."""
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *terms: bytes) -> bytes:
    """Scope (path) {terms}."""
    return _package(bytes([SCOPE_OP]), name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    """Device (path) {terms}."""
    return _package(bytes([EXT_OP_PREFIX, DEVICE_OP]), name_string(path) + b"".join(terms))


def method(
    path: str, *terms: bytes, args: int = 0, serialized: bool = False, sync_level: int = 0
) -> bytes:
    """Method (path, args, Serialized|NotSerialized, sync_level) {terms}."""
    if not 0 <= args <= METHOD_MAX_ARGS:
        raise AmlError(f"AML method {path!r} takes 0..{METHOD_MAX_ARGS} arguments, not {args}")
    if not 0 <= sync_level <= METHOD_MAX_SYNC_LEVEL:
        raise AmlError(f"AML method {path!r} sync level {sync_level} is outside 0..15")
    if sync_level and not serialized:
        raise AmlError(f"AML method {path!r}: a sync level needs a serialized method")
    flags = args | (METHOD_SERIALIZED if serialized else 0)
    flags |= sync_level << METHOD_SYNC_LEVEL_SHIFT
    return _package(bytes([METHOD_OP]), name_string(path) + bytes([flags]) + b"".join(terms))


def return_(value: bytes) -> bytes:
    """Return (value)."""
    return bytes([RETURN_OP]) + value


# --- resource descriptors (ACPI 6.5 §6.4) ---------------------------------------------

# Small descriptors: one tag byte = (type << 3) | length (§6.4.2).
SMALL_IRQ_TYPE = 0x04  # §6.4.2.1
SMALL_IO_TYPE = 0x08  # §6.4.2.5
SMALL_END_TAG_TYPE = 0x0F  # §6.4.2.9
# Large descriptors: tag byte 0x80 | type, then a 16-bit length of the data (§6.4.3).
LARGE_MEMORY32_FIXED = 0x86  # §6.4.3.4
LARGE_EXTENDED_IRQ = 0x89  # §6.4.3.6

IO_DECODE16 = 0x01  # §6.4.2.5 information byte bit 0: the device decodes 16 address bits
MEMORY_READ_WRITE = 0x01  # §6.4.3.4 information byte bit 0
# §6.4.3.6 interrupt vector flags.
EXT_IRQ_CONSUMER = 1 << 0
EXT_IRQ_EDGE = 1 << 1
EXT_IRQ_ACTIVE_LOW = 1 << 2
EXT_IRQ_SHARED = 1 << 3
EXT_IRQ_WAKE_CAPABLE = 1 << 4

ISA_IRQS = 16  # an IRQ descriptor's mask covers IRQ 0-15
MAX_EXT_IRQS = 255  # the interrupt table length is one byte
_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFF_FFFF


def _small(rtype: int, data: bytes) -> bytes:
    return bytes([(rtype << 3) | len(data)]) + data


def _large(tag: int, data: bytes) -> bytes:
    return bytes([tag]) + struct.pack("<H", len(data)) + data


def io_port(base: int, length: int, alignment: int = 1) -> bytes:
    """IO (Decode16, base, base, alignment, length): a fixed 16-bit I/O port range."""
    if not 0 <= base <= _U16_MAX or not 1 <= length <= 0xFF or not 0 <= alignment <= 0xFF:
        raise AmlError(f"IO descriptor {base:#x}+{length:#x} (align {alignment}) out of range")
    if base + length - 1 > _U16_MAX:
        raise AmlError(f"IO descriptor {base:#x}+{length:#x} runs past port 0xFFFF")
    return _small(SMALL_IO_TYPE, struct.pack("<BHHBB", IO_DECODE16, base, base, alignment,
                                             length))


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags () {irqs}: ISA IRQs, edge-triggered, active high, not shared."""
    if not irqs or any(not 0 <= irq < ISA_IRQS for irq in irqs):
        raise AmlError(f"IRQNoFlags needs one or more IRQs in 0..{ISA_IRQS - 1}, got {irqs}")
    mask = 0
    for irq in irqs:
        mask |= 1 << irq
    return _small(SMALL_IRQ_TYPE, struct.pack("<H", mask))


def memory32_fixed(base: int, length: int, *, writable: bool = True) -> bytes:
    """Memory32Fixed (ReadWrite|ReadOnly, base, length)."""
    if not 0 <= base <= _U32_MAX or not 0 < length <= _U32_MAX or base + length - 1 > _U32_MAX:
        raise AmlError(f"Memory32Fixed {base:#x}+{length:#x} does not fit 32 bits")
    info = MEMORY_READ_WRITE if writable else 0
    return _large(LARGE_MEMORY32_FIXED, struct.pack("<BII", info, base, length))


def interrupt(
    *gsis: int,
    consumer: bool = True,
    edge: bool = True,
    active_low: bool = False,
    shared: bool = False,
    wake_capable: bool = False,
) -> bytes:
    """Interrupt (ResourceConsumer|Producer, Edge|Level, ActiveHigh|Low, Exclusive|Shared)."""
    if not 1 <= len(gsis) <= MAX_EXT_IRQS or any(not 0 <= g <= _U32_MAX for g in gsis):
        raise AmlError(f"Interrupt descriptor needs 1..{MAX_EXT_IRQS} 32-bit GSIs, got {gsis}")
    flags = (
        (EXT_IRQ_CONSUMER if consumer else 0)
        | (EXT_IRQ_EDGE if edge else 0)
        | (EXT_IRQ_ACTIVE_LOW if active_low else 0)
        | (EXT_IRQ_SHARED if shared else 0)
        | (EXT_IRQ_WAKE_CAPABLE if wake_capable else 0)
    )
    data = bytes([flags, len(gsis)]) + struct.pack(f"<{len(gsis)}I", *gsis)
    return _large(LARGE_EXTENDED_IRQ, data)


END_TAG = (SMALL_END_TAG_TYPE << 3) | 1  # 0x79: End Tag with its one checksum byte


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {descriptors}: a Buffer ending with an End Tag (§6.4.2.9).

    The End Tag's checksum byte makes every byte of the template, itself included, sum
    to zero (a zero checksum would also be accepted; a real one costs nothing).
    """
    body = b"".join(descriptors) + bytes([END_TAG])
    return buffer(body + bytes([(-sum(body)) & 0xFF]))
