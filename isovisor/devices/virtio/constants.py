"""virtio numbers: device ids, feature bits, status bits, ring flags, MMIO registers.

Section numbers refer to the virtio 1.2 specification (OASIS, cs01).
"""

from __future__ import annotations

# --- Device ids (§5: one per device type) ------------------------------------------------
DEVICE_ID_NET = 1  # §5.1
DEVICE_ID_BLOCK = 2  # §5.2
DEVICE_ID_CONSOLE = 3  # §5.3
DEVICE_ID_ENTROPY = 4  # §5.4
DEVICE_ID_BALLOON = 5  # §5.5
DEVICE_ID_VSOCK = 19  # §5.10

# --- Device status field (§2.1) -------------------------------------------------------------
STATUS_ACKNOWLEDGE = 0x01  # the guest found the device
STATUS_DRIVER = 0x02  # the guest knows how to drive it
STATUS_DRIVER_OK = 0x04  # the driver is set up and ready
STATUS_FEATURES_OK = 0x08  # feature negotiation is complete
STATUS_DEVICE_NEEDS_RESET = 0x40  # the device hit an error it cannot recover from
STATUS_FAILED = 0x80  # the guest gave up on the device

# --- Reserved (transport/ring) feature bits (§6) ---------------------------------------------
F_INDIRECT_DESC = 1 << 28  # §2.7.5.3 indirect descriptor tables
F_EVENT_IDX = 1 << 29  # §2.7.7, §2.7.10 used_event / avail_event
F_VERSION_1 = 1 << 32  # §6: compliance with this specification (non-legacy)
F_ACCESS_PLATFORM = 1 << 33
F_RING_PACKED = 1 << 34
F_IN_ORDER = 1 << 35
F_ORDER_PLATFORM = 1 << 36
F_SR_IOV = 1 << 37
F_NOTIFICATION_DATA = 1 << 38
F_NOTIF_CONFIG_DATA = 1 << 39
F_RING_RESET = 1 << 40

# What every isovisor virtio device offers on the transport level. Everything else in the
# reserved range stays off: packed rings, in-order, notification data and queue reset are
# not implemented, so a driver never negotiates them.
TRANSPORT_FEATURES = F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX

# --- Split virtqueue layout (§2.7) ----------------------------------------------------------
DESC_F_NEXT = 1  # §2.7.5: the buffer continues via `next`
DESC_F_WRITE = 2  # §2.7.5: device-writable (otherwise device-readable)
DESC_F_INDIRECT = 4  # §2.7.5.3: the buffer holds a table of descriptors
AVAIL_F_NO_INTERRUPT = 1  # §2.7.7: driver does not want used-buffer notifications
USED_F_NO_NOTIFY = 1  # §2.7.10: device does not want available-buffer notifications

DESC_SIZE = 16  # struct virtq_desc: le64 addr, le32 len, le16 flags, le16 next
USED_ELEM_SIZE = 8  # struct virtq_used_elem: le32 id, le32 len
DESC_ALIGN = 16  # §2.7 alignment table
AVAIL_ALIGN = 2
USED_ALIGN = 4
MAX_QUEUE_SIZE = 32768  # §2.7: "The maximum Queue Size value is 32768"
MAX_CHAIN_BYTES = (1 << 32) - 1  # §2.7.5.2: a chain is never longer than 2^32 bytes


def desc_table_size(queue_size: int) -> int:
    """Bytes of a descriptor table (§2.7: 16 * Queue Size)."""
    return DESC_SIZE * queue_size


def avail_ring_size(queue_size: int) -> int:
    """Bytes of an available ring including used_event (§2.7: 6 + 2 * Queue Size)."""
    return 6 + 2 * queue_size


def used_ring_size(queue_size: int) -> int:
    """Bytes of a used ring including avail_event (§2.7: 6 + 8 * Queue Size)."""
    return 6 + USED_ELEM_SIZE * queue_size


# --- virtio-mmio registers (§4.2.2) ---------------------------------------------------------
MMIO_MAGIC_VALUE = 0x000  # R: 0x74726976 ("virt")
MMIO_VERSION = 0x004  # R: 2 (1 was legacy)
MMIO_DEVICE_ID = 0x008  # R
MMIO_VENDOR_ID = 0x00C  # R
MMIO_DEVICE_FEATURES = 0x010  # R
MMIO_DEVICE_FEATURES_SEL = 0x014  # W
MMIO_DRIVER_FEATURES = 0x020  # W
MMIO_DRIVER_FEATURES_SEL = 0x024  # W
MMIO_QUEUE_SEL = 0x030  # W
MMIO_QUEUE_NUM_MAX = 0x034  # R
MMIO_QUEUE_NUM = 0x038  # W
MMIO_QUEUE_READY = 0x044  # RW
MMIO_QUEUE_NOTIFY = 0x050  # W
MMIO_INTERRUPT_STATUS = 0x060  # R
MMIO_INTERRUPT_ACK = 0x064  # W
MMIO_STATUS = 0x070  # RW
MMIO_QUEUE_DESC_LOW = 0x080  # W
MMIO_QUEUE_DESC_HIGH = 0x084  # W
MMIO_QUEUE_DRIVER_LOW = 0x090  # W
MMIO_QUEUE_DRIVER_HIGH = 0x094  # W
MMIO_QUEUE_DEVICE_LOW = 0x0A0  # W
MMIO_QUEUE_DEVICE_HIGH = 0x0A4  # W
MMIO_SHM_SEL = 0x0AC  # W
MMIO_SHM_LEN_LOW = 0x0B0  # R
MMIO_SHM_LEN_HIGH = 0x0B4  # R
MMIO_SHM_BASE_LOW = 0x0B8  # R
MMIO_SHM_BASE_HIGH = 0x0BC  # R
MMIO_QUEUE_RESET = 0x0C0  # RW (only with VIRTIO_F_RING_RESET, which we never offer)
MMIO_CONFIG_GENERATION = 0x0FC  # R
MMIO_CONFIG = 0x100  # RW: device-specific configuration space

MMIO_MAGIC = 0x7472_6976
MMIO_VERSION_MODERN = 2
# VendorID: "ISOV" read as a little-endian u32 (no PCI vendor id is implied by virtio-mmio).
MMIO_VENDOR = 0x564F_5349
MMIO_WINDOW_SIZE = 0x1000  # one 4 KiB page per device
MMIO_CONFIG_MAX = MMIO_WINDOW_SIZE - MMIO_CONFIG

# InterruptStatus / InterruptACK bits (§4.2.2).
INT_USED_BUFFER = 0x1
INT_CONFIG_CHANGE = 0x2
INT_MASK = INT_USED_BUFFER | INT_CONFIG_CHANGE
