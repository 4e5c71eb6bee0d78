#!/usr/bin/env python3
"""virtio-blk request path, in process: requests per second through VirtioBlk.process_queue.

No VMM, no guest: one GuestMemory, a split virtqueue of 256 entries laid out as the bench
guest (tests/devices/virtio/guests/blk_bench.asm) lays it out (DEPTH chains of header,
data, status; VIRTQ_AVAIL_F_NO_INTERRUPT), and a raw image in the page cache. Each round
publishes DEPTH requests and calls process_queue once, as one queue notify does. This
isolates the device's per-request cost (chain walk, parsing, preadv, used ring) from
guest, exit and scheduling costs; bench/blk.py measures the whole path against QEMU.

    .venv/bin/python bench/blk_path.py [--mode seq|rand] [--rounds 2000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from isovisor.devices.events import SecurityEventLog  # noqa: E402
from isovisor.devices.virtio import constants as c  # noqa: E402
from isovisor.devices.virtio.blk import open_disk  # noqa: E402
from isovisor.devices.virtio.blk_disk import DiskSpec  # noqa: E402
from isovisor.devices.virtio.queue import QueueConfig, Virtqueue  # noqa: E402
from isovisor.memory import GuestMemory  # noqa: E402
from isovisor.memory.layout import MiB  # noqa: E402

QSIZE = 256
DEPTH = 64
DESC, AVAIL, USED = 0x200000, 0x201000, 0x202000
HDR, STATUS, DATA = 0x204000, 0x205000, 0x1000000
IMAGE_MIB = 64
SIZES = {"seq": 65536, "rand": 4096}


def setup(mem: GuestMemory, size: int) -> None:
    for j in range(DEPTH):
        base = 3 * j
        for k, (addr, length, flags) in enumerate((
            (HDR + 16 * j, 16, c.DESC_F_NEXT),
            (DATA + size * j, size, c.DESC_F_NEXT | c.DESC_F_WRITE),
            (STATUS + j, 1, c.DESC_F_WRITE),
        )):
            mem.write_all(DESC + 16 * (base + k), struct.pack("<QIHH", addr, length, flags,
                                                              base + k + 1))
    for slot in range(QSIZE):
        mem.write_u16(AVAIL + 4 + 2 * slot, 3 * (slot % DEPTH))
    mem.write_u16(AVAIL, 1)  # VIRTQ_AVAIL_F_NO_INTERRUPT


def run(mode: str, rounds: int, profile: bool) -> tuple[float, float]:
    """(requests per wall-clock second, requests per CPU second of this thread)."""
    size = SIZES[mode]
    sectors = IMAGE_MIB * MiB // 512
    with tempfile.TemporaryDirectory(prefix="isovisor-blkpath-") as tmp:
        image = Path(tmp) / "disk.img"
        image.write_bytes(bytes(range(256)) * (IMAGE_MIB * MiB // 256))
        mem = GuestMemory(64 * MiB)
        dev = open_disk(DiskSpec(image, readonly=True), SecurityEventLog())
        dev.acked_features = dev.avail_features
        cfg = QueueConfig(QSIZE)
        cfg.desc_table, cfg.avail_ring, cfg.used_ring, cfg.ready = DESC, AVAIL, USED, True
        q = Virtqueue(mem, cfg)
        setup(mem, size)
        rng = 12345
        headers = []
        pos = 0
        for _ in range(64):
            hdr = bytearray()
            for _ in range(DEPTH):
                if mode == "seq":
                    sector, pos = pos, (pos + size // 512) % sectors
                else:
                    rng = (rng * 1103515245 + 12345) & 0x7FFFFFFF
                    sector = (rng % (sectors // 8)) * 8
                hdr += struct.pack("<IIQ", 0, 0, sector)
            headers.append(bytes(hdr))
        idx = 0
        prof = cProfile.Profile() if profile else None
        began = time.perf_counter()
        cpu0 = time.thread_time()
        if prof:
            prof.enable()
        for r in range(rounds):
            mem.write_all(HDR, headers[r % len(headers)])
            idx = (idx + DEPTH) & 0xFFFF
            mem.write_u16(AVAIL + 2, idx)
            dev._process(0) if dev.queues else dev.process_queue(0, q)
        if prof:
            prof.disable()
        took = time.perf_counter() - began
        cpu = time.thread_time() - cpu0
        if mem.read_u16(USED + 2) != idx:
            raise SystemExit("bench/blk_path.py: the device did not complete every request")
        if any(mem.read_exact(STATUS, DEPTH)):
            raise SystemExit("bench/blk_path.py: a request failed")
        dev.close()
        mem.close()
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return rounds * DEPTH / took, rounds * DEPTH / cpu


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="virtio-blk requests/s through the device path")
    p.add_argument("--mode", choices=sorted(SIZES), default="rand")
    p.add_argument("--rounds", type=int, default=2000)
    p.add_argument("--profile", action="store_true", help="cProfile the rounds")
    args = p.parse_args(argv)
    rate, cpu_rate = run(args.mode, args.rounds, args.profile)
    size = SIZES[args.mode]
    print(f"{args.mode}: {rate:,.0f} requests/s ({rate * size / 1e6:,.1f} MB/s); "
          f"{1e6 / cpu_rate:.2f} us of CPU per request ({cpu_rate:,.0f}/s on a free core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
