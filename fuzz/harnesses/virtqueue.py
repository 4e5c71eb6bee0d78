"""Split virtqueues: queue setup (check_layout) and the descriptor-chain walker, with
oracles independent of the checks under test (RAM bounds computed here, hop counts
bounded here), so a weakened check shows up as a failed assertion, not a hang."""

from __future__ import annotations

import itertools

from fuzz import rig
from fuzz.data import Data
from isovisor.devices.virtio import constants as vc
from isovisor.devices.virtio.chain import GuestProtocolError
from isovisor.devices.virtio.queue import QueueConfig, Virtqueue, check_layout

COVERS = ("virtqueue:split",)
MAX_SIZE = 256


def _setup_check(d: Data) -> None:
    mem = rig.memory()
    cfg = QueueConfig(MAX_SIZE, size=d.u16(), desc_table=d.u64(), avail_ring=d.u64(),
                      used_ring=d.u64())
    if d.flag():  # mostly near the end of RAM, where off-by-ones live
        cfg.desc_table = rig.RAM - d.u16()
        cfg.avail_ring = rig.RAM - d.u16()
        cfg.used_ring = rig.RAM - d.u16()
    try:
        check_layout(mem, cfg)
    except GuestProtocolError:
        return
    n = cfg.size
    assert 0 < n <= MAX_SIZE and n & (n - 1) == 0, f"queue size {n} accepted"
    for addr, length, align in ((cfg.desc_table, vc.desc_table_size(n), vc.DESC_ALIGN),
                                (cfg.avail_ring, vc.avail_ring_size(n), vc.AVAIL_ALIGN),
                                (cfg.used_ring, vc.used_ring_size(n), vc.USED_ALIGN)):
        assert addr % align == 0, f"misaligned ring part at {addr:#x} accepted"
        assert addr >= 0 and addr + length <= rig.RAM, f"ring part {addr:#x}+{length} outside RAM"


def _walk(d: Data) -> None:
    mem = rig.memory()
    rig.clear(mem, 1)
    feats = d.u8()
    cfg = rig.load_ring(d, mem, 0, MAX_SIZE)
    try:
        q = Virtqueue(mem, cfg, event_idx=bool(feats & 1), indirect=bool(feats & 2))
    except GuestProtocolError:
        return
    size = cfg.size
    for _ in range(size + 1):
        try:
            chain = q.pop()
        except GuestProtocolError:
            return
        if chain is None:
            return
        # At most one table of `size` hops plus one indirect table of at most `size`.
        limit = 2 * size + 1
        try:
            descs = list(itertools.islice(iter(chain), limit + 1))
        except GuestProtocolError:
            return  # the device stops here (NEEDS_RESET)
        assert len(descs) <= limit, f"chain from head {chain.head} walked {len(descs)} hops"
        total = 0
        for desc in descs:
            total += desc.len
            assert desc.addr >= 0 and desc.addr + desc.len <= rig.RAM, \
                f"descriptor {desc.addr:#x}+{desc.len:#x} outside RAM accepted"
        assert total <= vc.MAX_CHAIN_BYTES
        writable = [x.writable for x in descs]
        assert writable == sorted(writable), "readable descriptor after a writable one"
        q.add_used(chain.head, 0)
        q.needs_notification()


def one_input(data: bytes) -> None:
    d = Data(data)
    if d.u8() % 4 == 0:
        _setup_check(d)
    else:
        _walk(d)
