"""The descriptor-chain walker: every §2.7.4-§2.7.5 rule on crafted tables, plus fuzzing."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.chain import (
    BadRequest,
    Descriptor,
    DescriptorChain,
    GuestProtocolError,
)
from isovisor.memory import GuestMemory
from isovisor.memory.layout import GiB, MiB
from tests.devices.virtio import BUF_ADDR, DESC_ADDR, FakeDriver

N, W, IND = c.DESC_F_NEXT, c.DESC_F_WRITE, c.DESC_F_INDIRECT
TABLE = 0x40000  # an indirect table


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


@pytest.fixture(scope="module")
def big_mem() -> Iterator[GuestMemory]:
    """RAM on both sides of the MMIO hole (sparse: untouched pages cost nothing)."""
    m = GuestMemory(3 * GiB + 16 * MiB)
    yield m
    m.close()


def chain(
    mem: GuestMemory, head: int = 0, size: int = 16, indirect: bool = True
) -> DescriptorChain:
    return DescriptorChain(mem, DESC_ADDR, size, head, indirect_allowed=indirect)


def walk(
    mem: GuestMemory, head: int = 0, size: int = 16, indirect: bool = True
) -> list[Descriptor]:
    return list(chain(mem, head, size, indirect))


def refused(mem: GuestMemory, match: str, **kw: int) -> None:
    with pytest.raises(GuestProtocolError, match=match):
        walk(mem, **kw)  # type: ignore[arg-type]


# --- well-formed chains ------------------------------------------------------------------


def test_readable_then_writable_chain(mem: GuestMemory) -> None:
    d = FakeDriver(mem)
    d.set_desc(3, BUF_ADDR, 16, N, 7)
    d.set_desc(7, BUF_ADDR + 0x100, 32, N | W, 1)
    d.set_desc(1, BUF_ADDR + 0x200, 8, W)
    assert walk(mem, head=3) == [
        Descriptor(BUF_ADDR, 16, False, BUF_ADDR),
        Descriptor(BUF_ADDR + 0x100, 32, True, BUF_ADDR + 0x100),
        Descriptor(BUF_ADDR + 0x200, 8, True, BUF_ADDR + 0x200),
    ]


def test_descriptor_is_immutable() -> None:
    d = Descriptor(1, 2, False, 1)
    with pytest.raises(AttributeError):
        d.len = 5  # type: ignore[misc]


def test_longest_legal_chain_uses_every_entry(mem: GuestMemory) -> None:
    d = FakeDriver(mem, size=8)
    for i in range(7):
        d.set_desc(i, BUF_ADDR, 1, N, i + 1)
    d.set_desc(7, BUF_ADDR, 1, 0)
    assert len(walk(mem, size=8)) == 8


def test_zero_length_buffers_are_allowed(mem: GuestMemory) -> None:
    FakeDriver(mem).set_desc(0, BUF_ADDR, 0, W)
    assert walk(mem) == [Descriptor(BUF_ADDR, 0, True, BUF_ADDR)]


def test_indirect_table(mem: GuestMemory) -> None:
    d = FakeDriver(mem)
    d.set_desc(0, TABLE, 3 * 16, IND | W)  # WRITE on the pointer is ignored (§2.7.5.3.2)
    d.set_desc(0, BUF_ADDR, 4, N, 2, table=TABLE)
    d.set_desc(2, BUF_ADDR + 4, 4, N | W, 1, table=TABLE)
    d.set_desc(1, BUF_ADDR + 8, 4, W, table=TABLE)
    got = walk(mem)
    assert [x.writable for x in got] == [False, True, True]


def test_direct_descriptors_then_one_indirect(mem: GuestMemory) -> None:
    """§2.7.5.3.2: zero or more chained descriptors followed by a single indirect one."""
    d = FakeDriver(mem)
    d.set_desc(0, BUF_ADDR, 4, N, 1)
    d.set_desc(1, TABLE, 16, IND)
    d.set_desc(0, BUF_ADDR + 4, 4, W, table=TABLE)
    assert [x.writable for x in walk(mem)] == [False, True]


# --- the rules --------------------------------------------------------------------------


def test_head_outside_queue(mem: GuestMemory) -> None:
    refused(mem, "head 16 is outside", head=16)


def test_next_outside_queue(mem: GuestMemory) -> None:
    FakeDriver(mem).set_desc(0, BUF_ADDR, 4, N, 16)
    refused(mem, "links to 16")


def test_self_loop(mem: GuestMemory) -> None:
    FakeDriver(mem).set_desc(5, BUF_ADDR, 4, N, 5)
    refused(mem, "exceeds 16 hops", head=5)


def test_two_descriptor_loop(mem: GuestMemory) -> None:
    d = FakeDriver(mem)
    d.set_desc(0, BUF_ADDR, 4, N | W, 1)
    d.set_desc(1, BUF_ADDR, 4, N | W, 0)
    refused(mem, "a loop")


def test_loop_inside_indirect_table(mem: GuestMemory) -> None:
    d = FakeDriver(mem)
    d.set_desc(0, TABLE, 2 * 16, IND)
    d.set_desc(0, BUF_ADDR, 4, N, 1, table=TABLE)
    d.set_desc(1, BUF_ADDR, 4, N, 0, table=TABLE)
    refused(mem, "hops")


def test_indirect_next_outside_table(mem: GuestMemory) -> None:
    d = FakeDriver(mem)
    d.set_desc(0, TABLE, 2 * 16, IND)
    d.set_desc(0, BUF_ADDR, 4, N, 2, table=TABLE)  # the table has entries 0 and 1
    refused(mem, "outside a table of 2")


def test_nested_indirect(mem: GuestMemory) -> None:
    d = FakeDriver(mem)
    d.set_desc(0, TABLE, 16, IND)
    d.set_desc(0, TABLE + 0x100, 16, IND, table=TABLE)
    refused(mem, "nested")


def test_indirect_without_feature(mem: GuestMemory) -> None:
    FakeDriver(mem).set_desc(0, TABLE, 16, IND)
    refused(mem, "without VIRTIO_F_INDIRECT_DESC", indirect=False)


def test_indirect_with_next(mem: GuestMemory) -> None:
    FakeDriver(mem).set_desc(0, TABLE, 16, IND | N, 1)
    refused(mem, "both INDIRECT and NEXT")


@pytest.mark.parametrize("length", [0, 8, 17, 40])
def test_indirect_table_length_must_be_nonzero_multiple_of_16(
    mem: GuestMemory, length: int
) -> None:
    FakeDriver(mem).set_desc(0, TABLE, length, IND)
    refused(mem, "not a non-zero multiple of 16")


def test_indirect_table_longer_than_queue(mem: GuestMemory) -> None:
    FakeDriver(mem).set_desc(0, TABLE, 17 * 16, IND)
    refused(mem, "exceeds queue size")


def test_indirect_table_outside_ram(mem: GuestMemory) -> None:
    FakeDriver(mem).set_desc(0, mem.size - 16, 32, IND)
    refused(mem, "indirect table")


def test_readable_after_writable(mem: GuestMemory) -> None:
    d = FakeDriver(mem)
    d.set_desc(0, BUF_ADDR, 4, N | W, 1)
    d.set_desc(1, BUF_ADDR, 4, 0)
    refused(mem, "device-readable descriptor 1 follows")


def test_readable_after_writable_across_indirect(mem: GuestMemory) -> None:
    d = FakeDriver(mem)
    d.set_desc(0, BUF_ADDR, 4, N | W, 1)
    d.set_desc(1, TABLE, 16, IND)
    d.set_desc(0, BUF_ADDR, 4, 0, table=TABLE)
    refused(mem, "follows a device-writable")


def test_buffer_outside_ram(mem: GuestMemory) -> None:
    FakeDriver(mem).set_desc(0, mem.size, 1, W)
    refused(mem, "not RAM")


def test_buffer_running_past_end_of_ram(mem: GuestMemory) -> None:
    FakeDriver(mem).set_desc(0, mem.size - 8, 16, W)
    refused(mem, "runs past RAM")


def test_buffer_wrapping_64_bits(mem: GuestMemory) -> None:
    FakeDriver(mem).set_desc(0, (1 << 64) - 0x100, 0x200, W)
    refused(mem, "buffer")


def test_buffer_overlapping_the_mmio_hole(big_mem: GuestMemory) -> None:
    d = FakeDriver(big_mem)
    d.set_desc(0, 0xBFFF_FF00, 0x200, W)  # RAM below the hole, running into it
    refused(big_mem, "runs past RAM")
    d.set_desc(0, 0xD000_0000, 0x40, W)  # the virtio-mmio windows themselves
    refused(big_mem, "not RAM")
    d.set_desc(0, 0x1_0000_0000, 0x40, W)  # RAM above the hole is fine
    assert walk(big_mem)[0].addr == 0x1_0000_0000


def test_total_length_overflow(big_mem: GuestMemory) -> None:
    d = FakeDriver(big_mem)
    d.set_desc(0, 0, 0x8000_0000, N | W, 1)
    d.set_desc(1, 0, 0x8000_0000, W)  # 2^32 bytes in total: one too many
    refused(big_mem, r"> 2\^32 - 1")
    d.set_desc(1, 0, 0x7FFF_FFFF, W)
    assert sum(x.len for x in walk(big_mem)) == 0xFFFF_FFFF


def test_a_broken_tail_refuses_the_whole_chain(mem: GuestMemory) -> None:
    """No descriptor is handed out before the whole chain is checked: a good head with a
    broken tail yields nothing."""
    d = FakeDriver(mem)
    d.set_desc(0, BUF_ADDR, 4, N, 1)
    d.set_desc(1, mem.size, 4, 0)
    ch = chain(mem)
    with pytest.raises(GuestProtocolError):
        iter(ch)
    with pytest.raises(GuestProtocolError):
        ch.descriptors()


# --- helpers ----------------------------------------------------------------------------


def test_readable_bytes_and_write_writable(mem: GuestMemory) -> None:
    d = FakeDriver(mem)
    mem.write_all(BUF_ADDR, b"abcd")
    mem.write_all(BUF_ADDR + 0x10, b"efg")
    d.set_desc(0, BUF_ADDR, 4, N, 1)
    d.set_desc(1, BUF_ADDR + 0x10, 3, N, 2)
    d.set_desc(2, BUF_ADDR + 0x100, 2, N | W, 3)
    d.set_desc(3, BUF_ADDR + 0x200, 4, W)
    ch = chain(mem)
    assert ch.readable_bytes(7) == b"abcdefg"
    with pytest.raises(BadRequest):
        ch.readable_bytes(6)
    assert ch.writable_len == 6
    assert ch.write_writable(b"XYZ", offset=1) == 3
    assert mem.read_exact(BUF_ADDR + 0x100, 2) == b"\0X"
    assert mem.read_exact(BUF_ADDR + 0x200, 2) == b"YZ"
    with pytest.raises(BadRequest):
        ch.write_writable(b"1234567")
    assert mem.read_exact(BUF_ADDR + 0x100, 2) == b"\0X"  # nothing written on refusal


def test_views_are_released(mem: GuestMemory) -> None:
    d = FakeDriver(mem)
    d.set_desc(0, BUF_ADDR, 4, N, 1)
    d.set_desc(1, BUF_ADDR + 0x100, 4, W)
    ch = chain(mem)
    with ch.writable_views() as views:
        views[0][:] = b"wxyz"
        kept = views[0]
    with ch.readable_views() as rviews:
        assert len(rviews) == 1 and len(rviews[0]) == 4
    assert mem.read_exact(BUF_ADDR + 0x100, 4) == b"wxyz"
    with pytest.raises(ValueError):
        kept[0]  # released


def test_chain_is_walked_once(mem: GuestMemory) -> None:
    d = FakeDriver(mem)
    d.set_desc(0, BUF_ADDR, 4, W)
    ch = chain(mem)
    first = ch.descriptors()
    d.set_desc(0, mem.size, 4, W)  # the guest rewrites the descriptor afterwards
    assert ch.descriptors() == first
    assert list(ch) == list(first)


# --- fuzzing ----------------------------------------------------------------------------

_FUZZ_MEM = GuestMemory(16 * MiB)
_addr = st.one_of(
    st.integers(0, 0x200_0000), st.sampled_from([0, TABLE, BUF_ADDR, (1 << 64) - 16])
)
_desc = st.tuples(
    _addr,
    st.one_of(st.integers(0, 64), st.sampled_from([16, 32, 0xFFFF_FFFF, 0x8000_0000])),
    st.integers(0, 7),  # NEXT | WRITE | INDIRECT in every combination
    st.integers(0, 17),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    main=st.lists(_desc, min_size=8, max_size=8),
    table=st.lists(_desc, min_size=8, max_size=8),
    head=st.integers(0, 9),
    indirect=st.booleans(),
)
def test_fuzz_walker_yields_only_valid_descriptors_or_refuses(
    main: list[tuple[int, int, int, int]],
    table: list[tuple[int, int, int, int]],
    head: int,
    indirect: bool,
) -> None:
    mem = _FUZZ_MEM
    for base, entries in ((DESC_ADDR, main), (TABLE, table)):
        mem.write_all(base, b"".join(struct.pack("<QIHH", *e) for e in entries))
    got: list[Descriptor] = []
    try:
        for d in DescriptorChain(mem, DESC_ADDR, 8, head, indirect_allowed=indirect):
            got.append(d)
            assert len(got) <= 2 * 8  # the hop budgets bound every walk
    except GuestProtocolError:
        pass
    assert sum(d.len for d in got) <= 0xFFFF_FFFF
    for d in got:
        assert mem.is_ram(d.addr, d.len) or (d.len == 0 and d.addr == mem.size)
    flags = [d.writable for d in got]
    assert flags == sorted(flags)  # readable (False) before writable (True)


def test_descriptors_carry_the_checked_offset(big_mem: GuestMemory) -> None:
    """Above the MMIO hole a guest address is not its memfd offset: devices index
    GuestMemory.ram by the offset the walker checked, and read the right bytes."""
    from isovisor.memory.layout import MMIO_HOLE_END

    d = FakeDriver(big_mem)
    high = MMIO_HOLE_END + 0x2000
    big_mem.write_all(high, b"above the hole")
    d.set_desc(0, BUF_ADDR, 4, N, 1)
    d.set_desc(1, high, 14, W)
    low_desc, high_desc = walk(big_mem)
    assert low_desc.offset == big_mem.check_range(BUF_ADDR, 4) == BUF_ADDR
    assert high_desc.offset == big_mem.check_range(high, 14) != high
    ram = big_mem.ram
    assert bytes(ram[high_desc.offset : high_desc.offset + 14]) == b"above the hole"
