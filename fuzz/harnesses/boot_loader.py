"""The boot-image loaders (PVH ELF, vmlinux ELF64, bzImage) behind load_kernel, with a
command line and an initrd: images come from tenants (the images API). Oracles: only
BootError escapes; a refused image leaves RAM untouched; an accepted one lies in RAM."""

from __future__ import annotations

from fuzz.data import Data
from isovisor.memory import GuestMemory
from isovisor.memory.layout import MiB
from isovisor.vmm.boot.errors import BootError
from isovisor.vmm.boot.loader import load_kernel

COVERS = ("boot:*",)
RAM = 32 * MiB
PROTOCOLS = ("auto", "auto", "pvh", "linux")


class RecordingMemory(GuestMemory):
    """Guest RAM that counts every write path a loader could take."""

    writes = 0

    def write_all(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.writes += 1
        super().write_all(addr, data)

    def fill(self, addr: int, length: int, value: int = 0) -> None:
        self.writes += 1
        super().fill(addr, length, value)

    def view(self, addr: int, length: int) -> memoryview:
        self.writes += 1
        return super().view(addr, length)


_mem: RecordingMemory | None = None


def one_input(data: bytes) -> None:
    global _mem
    if _mem is None:
        _mem = RecordingMemory(RAM)
    mem = _mem
    d = Data(data)
    protocol = d.pick(PROTOCOLS)
    cmdline = d.blob(512).decode("latin-1")
    initrd = None if d.flag() else d.blob(64 * 1024)
    rsdp = 0xE0000 if d.flag() else None
    image = d.rest()
    before = mem.writes
    try:
        entry = load_kernel(mem, image, cmdline=cmdline, initrd=initrd,
                            protocol=protocol, acpi_rsdp=rsdp)  # type: ignore[arg-type]
    except BootError:
        assert mem.writes == before, "a refused image wrote guest RAM"
        return
    assert 0 <= entry.kernel_start <= entry.kernel_end <= RAM
    assert mem.is_ram(entry.boot_struct)
    if entry.initrd is not None:
        addr, size = entry.initrd
        assert addr >= 0 and addr + size <= RAM
