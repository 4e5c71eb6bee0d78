"""Split virtqueues: setup checks, pop/add_used, index arithmetic, EVENT_IDX."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from isovisor.devices.virtio import constants as c
from isovisor.devices.virtio.chain import GuestProtocolError
from isovisor.devices.virtio.queue import QueueConfig, Virtqueue, check_layout
from isovisor.memory import GuestMemory
from isovisor.memory.layout import MiB
from tests.devices.virtio import AVAIL_ADDR, BUF_ADDR, DESC_ADDR, USED_ADDR, FakeDriver


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


def queue(mem: GuestMemory, size: int = 8, **kw: bool) -> tuple[Virtqueue, FakeDriver]:
    d = FakeDriver(mem, size)
    return Virtqueue(mem, d.config(), **kw), d


# --- setup checks (§2.7, §4.2.3.2) ------------------------------------------------------


def test_config_defaults_and_reset() -> None:
    cfg = QueueConfig(256)
    assert (cfg.size, cfg.ready, cfg.desc_table) == (256, False, 0)
    cfg.size, cfg.ready, cfg.used_ring = 8, True, 0x1000
    cfg.reset()
    assert cfg == QueueConfig(256)
    with pytest.raises(ValueError):
        QueueConfig(100)


@pytest.mark.parametrize("size", [0, 3, 12, 32])
def test_size_must_be_power_of_two_within_max(mem: GuestMemory, size: int) -> None:
    cfg = FakeDriver(mem, 16).config(max_size=16)
    cfg.size = size
    with pytest.raises(GuestProtocolError, match="power of two"):
        check_layout(mem, cfg)


@pytest.mark.parametrize(
    ("field", "addr"),
    [("desc_table", DESC_ADDR + 8), ("avail_ring", AVAIL_ADDR + 1), ("used_ring", USED_ADDR + 2)],
)
def test_alignment(mem: GuestMemory, field: str, addr: int) -> None:
    cfg = FakeDriver(mem).config()
    setattr(cfg, field, addr)
    with pytest.raises(GuestProtocolError, match="aligned"):
        check_layout(mem, cfg)


@pytest.mark.parametrize(
    ("field", "size_fn"),
    [
        ("desc_table", c.desc_table_size),
        ("avail_ring", c.avail_ring_size),
        ("used_ring", c.used_ring_size),
    ],
)
def test_each_whole_ring_must_be_in_ram(mem: GuestMemory, field: str, size_fn: object) -> None:
    cfg = FakeDriver(mem, 16).config()
    assert callable(size_fn)
    whole: int = size_fn(16)
    # Exactly at the end of RAM (event-index field included) is fine; 4 bytes later is not.
    setattr(cfg, field, (mem.size - whole) & ~15)
    check_layout(mem, cfg)
    setattr(cfg, field, ((mem.size - whole) & ~15) + 16)
    with pytest.raises(GuestProtocolError, match="runs past RAM"):
        check_layout(mem, cfg)
    setattr(cfg, field, 0xD000_0000)  # the virtio-mmio window is not RAM
    with pytest.raises(GuestProtocolError, match="not RAM"):
        check_layout(mem, cfg)


def test_virtqueue_rechecks_layout(mem: GuestMemory) -> None:
    cfg = FakeDriver(mem).config()
    cfg.used_ring = 1 << 40
    with pytest.raises(GuestProtocolError):
        Virtqueue(mem, cfg)


# --- pop / add_used ---------------------------------------------------------------------


def test_pop_empty_then_one_chain(mem: GuestMemory) -> None:
    q, d = queue(mem)
    assert q.pop() is None
    d.writable_chain(5, BUF_ADDR, 64)
    d.publish(5)
    ch = q.pop()
    assert ch is not None and ch.head == 5
    assert ch.writable_len == 64
    assert q.pop() is None
    q.add_used(5, 64)
    assert d.used_idx() == 1
    assert d.used_elem(0) == (5, 64)


def test_several_chains_in_order(mem: GuestMemory) -> None:
    q, d = queue(mem)
    for h in (2, 0, 7):
        d.writable_chain(h, BUF_ADDR + h * 0x100, 16)
    d.publish(2, 0, 7)
    assert q.pending() == 3
    heads = []
    while (ch := q.pop()) is not None:
        heads.append(ch.head)
        q.add_used(ch.head, 16)
    assert heads == [2, 0, 7]
    assert [d.used_elem(i)[0] for i in range(3)] == [2, 0, 7]


def test_indices_wrap_at_65536(mem: GuestMemory) -> None:
    q, d = queue(mem, size=4)
    q.next_avail = q.next_used = 0xFFFE
    d.set_avail_idx(0xFFFE)
    d.writable_chain(0, BUF_ADDR, 8)
    d.publish(0, 0, 0)  # avail idx 0xFFFE -> 0x0001
    for _ in range(3):
        ch = q.pop()
        assert ch is not None
        q.add_used(ch.head, 8)
    assert q.pop() is None
    assert d.used_idx() == 1 and q.next_avail == 1


def test_avail_index_jump_is_hostile(mem: GuestMemory) -> None:
    q, d = queue(mem, size=8)
    d.set_avail_idx(8)  # exactly a full ring: legal
    assert q.pending() == 8
    d.set_avail_idx(9)  # more than the queue can hold since the last consumed
    with pytest.raises(GuestProtocolError, match="moved 9 entries"):
        q.pop()
    d.set_avail_idx(0xFFFF)  # "going backwards" is a huge jump forward modulo 2^16
    with pytest.raises(GuestProtocolError):
        q.pending()


def test_bad_head_fails_when_walked(mem: GuestMemory) -> None:
    q, d = queue(mem)
    d.publish(8)  # the table has entries 0..7
    ch = q.pop()
    assert ch is not None
    with pytest.raises(GuestProtocolError, match="head 8"):
        ch.descriptors()
    with pytest.raises(GuestProtocolError):
        q.add_used(8, 0)


def test_undo_pop(mem: GuestMemory) -> None:
    q, d = queue(mem)
    d.writable_chain(1, BUF_ADDR, 8)
    d.publish(1)
    assert q.pop() is not None
    q.undo_pop()
    ch = q.pop()
    assert ch is not None and ch.head == 1


def test_used_len_must_fit_32_bits(mem: GuestMemory) -> None:
    q, _ = queue(mem)
    with pytest.raises(ValueError):
        q.add_used(0, 1 << 32)


def test_indirect_flag_follows_negotiation(mem: GuestMemory) -> None:
    for negotiated in (False, True):
        q, d = queue(mem, indirect=negotiated)
        d.set_desc(0, 0x40000, 16, c.DESC_F_INDIRECT)
        d.set_desc(0, BUF_ADDR, 8, c.DESC_F_WRITE, table=0x40000)
        d.publish(0)
        ch = q.pop()
        assert ch is not None
        if negotiated:
            assert ch.writable_len == 8
        else:
            with pytest.raises(GuestProtocolError):
                ch.descriptors()


# --- notification suppression (§2.7.7, §2.7.10) -------------------------------------------


def test_no_interrupt_flag_without_event_idx(mem: GuestMemory) -> None:
    q, d = queue(mem)
    q.add_used(0, 0)
    assert q.needs_notification()
    d.set_avail_flags(c.AVAIL_F_NO_INTERRUPT)
    q.add_used(0, 0)
    assert not q.needs_notification()


def test_event_idx_used_event(mem: GuestMemory) -> None:
    q, d = queue(mem, event_idx=True)
    d.set_avail_flags(c.AVAIL_F_NO_INTERRUPT)  # ignored with EVENT_IDX (§2.7.7.2)
    d.set_used_event(2)  # "interrupt me when used idx passes 2", i.e. reaches 3
    q.add_used(0, 0)
    assert q.needs_notification()  # the first check always notifies
    q.add_used(0, 0)
    assert not q.needs_notification()  # used idx 2
    q.add_used(0, 0)
    assert q.needs_notification()  # used idx 3 crossed used_event 2
    assert not q.needs_notification()  # nothing new since
    q.add_used(0, 0)
    q.add_used(0, 0)
    d.set_used_event(2)
    assert not q.needs_notification()  # entries 3 and 4 written; entry 2 was before
    d.set_used_event(3)
    q.add_used(0, 0)
    assert not q.needs_notification()  # entry 5 written: event 3 is not in [5, 6)
    d.set_used_event(7)
    q.add_used(0, 0)
    q.add_used(0, 0)
    assert q.needs_notification()  # a batch writing entries 6 and 7: 7 is the event


def test_event_idx_avail_event_and_rearm(mem: GuestMemory) -> None:
    q, d = queue(mem, event_idx=True)
    d.writable_chain(0, BUF_ADDR, 8)
    d.publish(0, 0)
    assert q.pop() is not None
    assert d.avail_event() == 1  # written on every pop: "notify me for entry 1 on"
    assert q.enable_notification()  # one more is pending: keep going
    assert q.pop() is not None
    assert not q.enable_notification()
    assert d.avail_event() == 2


# --- batches (pop_heads) ------------------------------------------------------------------


def test_pop_heads_takes_every_available_head_across_the_ring_end(mem: GuestMemory) -> None:
    q, d = queue(mem, size=8, event_idx=True)
    q.next_avail = q.next_used = 5
    d.set_avail_idx(5)
    for head in range(8):
        d.writable_chain(head, BUF_ADDR + 0x100 * head, 8)
    d.publish(7, 6, 5, 4, 3, 2)  # ring slots 5, 6, 7, 0, 1, 2
    assert q.pop_heads() == [7, 6, 5, 4, 3, 2]
    assert q.pop_heads() == [] and q.next_avail == 11
    assert d.avail_event() == 11  # one avail_event write for the batch (§2.7.10)
    assert [x.addr for x in q.walk(4)] == [BUF_ADDR + 0x400]
    q.undo_pop(2)
    assert q.pop_heads() == [3, 2]


def test_pop_heads_refuses_an_index_jump(mem: GuestMemory) -> None:
    q, d = queue(mem, size=8)
    d.set_avail_idx(9)
    with pytest.raises(GuestProtocolError, match="moved 9 entries"):
        q.pop_heads()
    assert q.next_avail == 0  # nothing consumed


def test_a_batch_ends_in_one_interrupt_with_event_idx(mem: GuestMemory) -> None:
    """Completing a whole batch publishes used.idx per element but asks for one interrupt
    when the driver's used_event lies inside the batch (§2.7.10)."""
    q, d = queue(mem, size=8, event_idx=True)
    assert q.needs_notification() is True  # the first check always notifies
    for head in range(6):
        d.writable_chain(head, BUF_ADDR, 8)
    d.publish(*range(6))
    d.set_used_event(5)  # "interrupt me once the 6th buffer is used"
    for head in q.pop_heads():
        q.add_used(head, 8)
    assert d.used_idx() == 6
    assert q.needs_notification() is True
    assert q.needs_notification() is False  # nothing new since
