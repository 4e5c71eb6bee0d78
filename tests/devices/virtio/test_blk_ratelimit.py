"""A guest held to its disk's rate limits: the benchmark guest (guests/blk_bench.asm) reads
as fast as it can through `isovisor run --disk IMG,bw=...` (or `iops=...`), and the time
its loop takes (from its start line to its done line on COM1) shows the configured rate,
with generous bounds for this shared two-core host."""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import NO_KVM_REASON, REPO, kvm_usable

pytestmark = pytest.mark.kvm

GUESTS = Path(__file__).parent / "guests"
DEPTH = 64  # the guest's requests per round


def build(tmp_path: Path) -> Path:
    for tool in ("nasm", "ld"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: run `make setup`")
    obj, elf = tmp_path / "blk_bench.o", tmp_path / "blk_bench.elf"
    include = Path(__file__).parents[3] / "guests" / "include"
    subprocess.run(["nasm", "-f", "elf32", "-I", f"{include}/", "-o", str(obj),
                    str(GUESTS / "blk_bench.asm")], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-T", str(GUESTS / "blk_bench.ld"), "-o", str(elf),
                    str(obj)], check=True)
    return elf


def loop_seconds(elf: Path, disk: str, cmdline: str, timeout: float = 120) -> float:
    """Run the guest; seconds between its start line and its done line."""
    cmd = [sys.executable, "-m", "isovisor.cli.main", "run", "--no-jail", "--kernel", str(elf),
           "--memory", "256M", "--disk", disk, "--cmdline", cmdline, "--timeout", str(timeout)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None
    out = b""
    started = done = None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        end = time.monotonic() + timeout + 30
        while time.monotonic() < end:
            if not sel.select(1):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            now = time.monotonic()
            out += chunk
            if started is None and b"blkbench: start\r\n" in out:
                started = now
            if done is None and b"blkbench: done" in out:
                done = now
    proc.kill() if proc.poll() is None else None
    _, err = proc.communicate()
    text = out.decode(errors="replace")
    assert started is not None and done is not None, f"{text}\n{err.decode(errors='replace')}"
    assert b"blkbench: done status=ok" in out, text
    return done - started


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    why = kvm_usable()
    if why is not None:
        pytest.skip(f"{NO_KVM_REASON}: {why}")
    image = tmp_path / "disk.img"
    with image.open("wb") as f:
        f.truncate(32 << 20)
    return build(tmp_path), image


def test_guest_held_to_bandwidth_limit(setup: tuple[Path, Path]) -> None:
    """3 rounds of 64 x 64 KiB = 12 MiB at bw=4M: about 2.9 s (the bucket holds 0.4 MiB)."""
    elf, image = setup
    seconds = loop_seconds(elf, f"{image},bw=4M", "mode=seq rounds=3")
    rate = 3 * DEPTH * 65536 / seconds
    print(f"bw=4M: 12 MiB in {seconds:.2f} s = {rate / (1 << 20):.2f} MiB/s")
    assert seconds >= 0.9 * (12 - 0.4) / 4  # never faster than the limit
    assert seconds <= 20  # and not stalled: throttled requests wait, then run


def test_guest_held_to_ops_limit(setup: tuple[Path, Path]) -> None:
    """6 rounds of 64 reads = 384 requests at iops=200: about 1.8 s (a 20-request bucket)."""
    elf, image = setup
    seconds = loop_seconds(elf, f"{image},iops=200", "mode=rand rounds=6")
    print(f"iops=200: 384 requests in {seconds:.2f} s = {384 / seconds:.0f}/s")
    assert seconds >= 0.9 * (384 - 20) / 200
    assert seconds <= 20
