"""Property tests: mutated, truncated and random images raise only BootImageError, and the
loader writes nothing on rejection and nothing outside RAM or its own areas on success."""

from __future__ import annotations

import os
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isovisor.memory import GuestMemory
from isovisor.memory.layout import HIGH_MEMORY_START
from isovisor.vmm.boot.errors import BootImageError
from isovisor.vmm.boot.loader import BootEntry, load_kernel
from tests.vmm.boot_images import MB, Seg, build_bzimage, build_elf, note, pattern, pvh_note

MEM_SIZES = (32 * MB, 48 * MB, 64 * MB)
# Modest by default (2 shared cores); ISOVISOR_FUZZ_EXAMPLES=20000 for a deeper run.
FUZZ_EXAMPLES = int(os.environ.get("ISOVISOR_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

SEEDS: dict[str, bytes] = {
    "pvh32": build_elf(
        [Seg(MB, pattern(0x200), 0x1000), Seg(MB + 0x2000, pattern(0x80), 0x100)],
        entry=0,
        bits=32,
        notes=note(b"GNU", 3, b"\1" * 8) + pvh_note(MB + 8),
    ),
    "pvh64": build_elf(
        [Seg(0x100_0000, pattern(0x300), 0x2000)],
        entry=0x100_0000,
        notes=pvh_note(0x100_0010, 8),
    ),
    "vmlinux": build_elf(
        [Seg(0x100_0000, pattern(0x200)), Seg(0x110_0000, pattern(0x100), 0x3000)],
        entry=0x100_0000,
    ),
    "bzimage": build_bzimage(pattern(0x800), init_size=0x10_0000),
    "bzimage_fixed": build_bzimage(pattern(0x400), relocatable=0, setup_sects=1),
}


class SpyMemory(GuestMemory):
    """GuestMemory that records every write the loader makes (write_obj/write_u* included)."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.writes: list[tuple[int, int]] = []

    def write_all(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.writes.append((addr, len(memoryview(data).cast("B"))))
        super().write_all(addr, data)

    def fill(self, addr: int, length: int, value: int = 0) -> None:
        self.writes.append((addr, length))
        super().fill(addr, length, value)

    def view(self, addr: int, length: int) -> memoryview:
        raise AssertionError("the loader must not take views of guest RAM")


def check_load(
    image: bytes, mem_size: int, load: Callable[[GuestMemory, bytes], BootEntry] | None = None
) -> None:
    mem = SpyMemory(mem_size)
    with mem:
        try:
            boot = (load or (lambda m, k: load_kernel(m, k)))(mem, image)
        except BootImageError as exc:
            assert str(exc)
            assert mem.writes == [], "a rejected image must leave guest RAM untouched"
            return
        assert mem.writes
        for addr, length in mem.writes:
            assert mem.is_ram(addr, length), f"write {addr:#x}+{length:#x} outside RAM"
            in_kernel = boot.kernel_start <= addr and addr + length <= boot.kernel_end
            in_initrd = boot.initrd is not None and boot.initrd[0] <= addr
            below_1m = addr + length <= HIGH_MEMORY_START
            assert in_kernel or in_initrd or below_1m, f"stray write {addr:#x}+{length:#x}"
        assert boot.kernel_start >= HIGH_MEMORY_START


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A seed image with some bytes overwritten (mostly in its headers) and maybe truncated."""
    image = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 8))):
        hot = draw(st.booleans())
        limit = min(len(image), 0x300) if hot else len(image)
        at = draw(st.integers(0, limit - 1))
        value = draw(st.binary(min_size=1, max_size=8))
        image[at : at + len(value)] = value
    if draw(st.booleans()):
        del image[draw(st.integers(0, len(image))) :]
    return bytes(image)


@FUZZ
@given(image=mutated(), mem_size=st.sampled_from(MEM_SIZES))
def test_mutated_images(image: bytes, mem_size: int) -> None:
    check_load(image, mem_size)


@FUZZ
@given(
    name=st.sampled_from(sorted(SEEDS)),
    cut=st.integers(0, max(len(s) for s in SEEDS.values())),
    protocol=st.sampled_from(["auto", "pvh", "linux"]),
)
def test_truncated_images(name: str, cut: int, protocol: str) -> None:
    image = SEEDS[name][:cut]
    check_load(image, 32 * MB, lambda m, k: load_kernel(m, k, protocol=protocol))  # type: ignore[arg-type]


@FUZZ
@given(
    prefix=st.sampled_from([b"", b"\x7fELF\x01\x01\x01", b"\x7fELF\x02\x01\x01"]),
    body=st.binary(max_size=2048),
    hdrs=st.booleans(),
)
def test_random_bytes(prefix: bytes, body: bytes, hdrs: bool) -> None:
    image = bytearray(prefix + body)
    if hdrs and len(image) >= 0x206:
        image[0x202:0x206] = b"HdrS"
    check_load(bytes(image), 32 * MB)


@FUZZ
@given(
    name=st.sampled_from(sorted(SEEDS)),
    cmdline=st.text(max_size=300),
    initrd_size=st.one_of(st.none(), st.integers(0, 40 * MB)),
)
def test_cmdline_and_initrd(name: str, cmdline: str, initrd_size: int | None) -> None:
    initrd = None if initrd_size is None else bytes(initrd_size)
    check_load(SEEDS[name], 32 * MB, lambda m, k: load_kernel(m, k, cmdline=cmdline, initrd=initrd))


def test_every_seed_loads() -> None:
    for name, image in SEEDS.items():
        with GuestMemory(32 * MB) as mem:
            assert load_kernel(mem, image).kernel_start >= HIGH_MEMORY_START, name
