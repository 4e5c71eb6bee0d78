"""Guest memory: the only code that touches guest RAM, with checked access."""

from isovisor.memory.errors import GuestMemoryClosedError, GuestMemoryError
from isovisor.memory.guest_memory import GuestMemory, MemoryRegion

__all__ = ["GuestMemory", "GuestMemoryClosedError", "GuestMemoryError", "MemoryRegion"]
