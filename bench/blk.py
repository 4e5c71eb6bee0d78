#!/usr/bin/env python3
"""virtio-blk throughput: isovisor against QEMU microvm, the same guest, in one run.

The guest (tests/devices/virtio/guests/blk_bench.asm, a PVH ELF) finds the virtio-blk
device in either VMM's virtio-mmio windows, prepares everything, prints `blkbench: start`,
then runs `rounds` rounds of 64 reads each (mode=seq: 64 KiB reads walking the disk;
mode=rand: 4 KiB reads at pseudo-random 4 KiB-aligned offsets), prints `blkbench: done
status=ok` and resets. This script reads each VMM's stdout as it arrives and times the
loop from the end of the start line to the first byte of the done line. Runs alternate
between the VMMs (the order flips every round); medians, min and max go to a table and
to bench/RESULTS.md (the `blk` section).

    .venv/bin/python bench/blk.py [--runs 5] [--seq-rounds 600] [--rand-rounds 600]
                                  [--wait hlt|poll] [--no-jail] [--no-write]

Both VMMs read the same raw image (64 MiB, in the host's page cache: this measures the
VMMs' request paths, not the host disk). isovisor: `isovisor run --disk IMG`, in its jailed
worker as in production (seccomp on every device thread; `--no-jail` to compare, and
the default without root, which the jail needs); QEMU: `-M microvm` with `-device
virtio-blk-device,drive=d0 -drive id=d0,file=IMG,format=raw,if=none` and
`-global virtio-mmio.force-legacy=false`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qemu_comparison import (
    REPO,
    BenchError,
    build_guest,
    check_tools,
    host_facts,
    isovisor_python,
    positive,
    time_at,
    timed_output,
)
from results_block import write_block

GUEST_DIR = REPO / "tests" / "devices" / "virtio" / "guests"
GUEST_ASM = GUEST_DIR / "blk_bench.asm"
GUEST_LD = GUEST_DIR / "blk_bench.ld"
RESULTS = REPO / "bench" / "RESULTS.md"
BEGIN_MARK = "<!-- blk:begin -->"
END_MARK = "<!-- blk:end -->"

QEMU = "qemu-system-x86_64"
MEMORY_MIB = 256
IMAGE_MIB = 64
DEPTH = 64  # requests per round (the guest's DEPTH)
TARGET_RATIO = 1.0
VMMS = ("isovisor", "qemu")
MODES = {"seq": ("MB/s", 65536), "rand": ("IOPS", 4096)}

START_LINE = b"blkbench: start"
DONE_PREFIX = b"blkbench: done status="
ERROR_PREFIX = b"blkbench: error"


@dataclass(frozen=True)
class Run:
    vmm: str
    mode: str
    rounds: int
    seconds: float

    @property
    def requests(self) -> int:
        return self.rounds * DEPTH

    @property
    def value(self) -> float:
        """MB/s (10^6 bytes) for seq, requests/s for rand."""
        if self.mode == "seq":
            return self.requests * MODES["seq"][1] / self.seconds / 1e6
        return self.requests / self.seconds


# --- set-up --------------------------------------------------------------------------


def make_image(path: Path) -> Path:
    """A 64 MiB image with non-zero content, read once so it sits in the page cache."""
    block = bytes(range(256)) * 4096
    with path.open("wb") as f:
        for _ in range(IMAGE_MIB):
            f.write(block)
    path.read_bytes()
    return path


JAIL = os.geteuid() == 0  # the worker jail needs root; bench/blk.py --no-jail turns it off


def vmm_command(vmm: str, elf: Path, image: Path, cmdline: str, timeout: float,
                qemu: str) -> list[str]:
    if vmm == "isovisor":
        return [
            isovisor_python(), "-m", "isovisor.cli.main", "run", *([] if JAIL else ["--no-jail"]),
            "--kernel", str(elf), "--cmdline", cmdline, "--memory", f"{MEMORY_MIB}M",
            "--disk", str(image), "--timeout", f"{timeout:g}",
        ]
    return [
        qemu, "-M", "microvm,x-option-roms=off,isa-serial=on", "-accel", "kvm",
        "-m", str(MEMORY_MIB), "-nodefaults", "-no-user-config", "-nographic",
        "-serial", "stdio", "-no-reboot", "-global", "virtio-mmio.force-legacy=false",
        "-kernel", str(elf), "-append", cmdline,
        "-device", "virtio-blk-device,drive=d0",
        "-drive", f"id=d0,file={image},format=raw,if=none",
    ]


# --- one run -------------------------------------------------------------------------


def loop_seconds(out: bytes, chunks: list[tuple[int, float]]) -> float | None:
    """From the arrival of the start line's end to that of the done line's first byte."""
    s = out.find(START_LINE)
    nl = out.find(b"\n", s) if s >= 0 else -1
    d = out.find(DONE_PREFIX, s) if s >= 0 else -1
    if nl < 0 or d < 0:
        return None
    return time_at(chunks, d) - time_at(chunks, nl)


def measure(vmm: str, mode: str, rounds: int, elf: Path, image: Path, timeout: float,
            qemu: str, wait: str = "hlt") -> Run:
    cmdline = f"mode={mode} rounds={rounds} wait={wait}"
    cmd = vmm_command(vmm, elf, image, cmdline, timeout, qemu)
    out, chunks, rc, stderr, _ = timed_output(cmd, timeout + 10)
    text = out.decode(errors="replace")

    def fail(why: str) -> BenchError:
        return BenchError(f"{vmm} ({mode}, rounds={rounds}): {why}\ncommand: {shlex.join(cmd)}"
                          f"\nexit status: {rc}\nstdout:\n{text.strip()}\nstderr:\n{stderr}")

    if ERROR_PREFIX in out:
        raise fail("the guest reported an error")
    seconds = loop_seconds(out, chunks)
    if seconds is None:
        raise fail("the guest never printed its start and done lines")
    if DONE_PREFIX + b"ok" not in out:
        raise fail("a request failed (status=bad)")
    if rc != 0:
        raise fail("the VMM exited with a nonzero status after the guest reset")
    if seconds <= 0:
        raise fail("start and done arrived together: raise the rounds")
    return Run(vmm, mode, rounds, seconds)


# --- reporting -----------------------------------------------------------------------


def summarize(runs: Sequence[Run]) -> tuple[float, float, float]:
    values = [r.value for r in runs]
    return statistics.median(values), min(values), max(values)


def markdown_block(results: dict[tuple[str, str], list[Run]], facts: dict[str, str],
                   args: argparse.Namespace) -> str:
    lines = [
        BEGIN_MARK,
        "## virtio-blk: sequential read MB/s (64 KiB) and random-read IOPS (4 KiB) "
        "(`bench/blk.py`)",
        "",
        "Guest `tests/devices/virtio/guests/blk_bench.asm` (the same PVH ELF under both "
        f"VMMs), 64 requests in flight per round, {args.runs} runs per VMM and mode, "
        f"alternating; isovisor {'in its jailed worker' if JAIL else 'with --no-jail'}. "
        f"seq: {args.seq_rounds} rounds of 64 x 64 KiB reads walking a "
        f"{IMAGE_MIB} MiB raw image; rand: {args.rand_rounds} rounds of 64 x 4 KiB reads at "
        "pseudo-random aligned offsets. The image is in the host's page cache. Time = from "
        "the end of the guest's `blkbench: start` line to the first byte of its "
        "`blkbench: done` line on the VMM's stdout. MB = 10^6 bytes.",
        "",
        "| mode | VMM | median | min | max | unit | vs QEMU |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    ratios: dict[str, float] = {}
    for mode, (unit, _) in MODES.items():
        q = results.get(("qemu", mode))
        i = results.get(("isovisor", mode))
        if q and i:
            ratios[mode] = summarize(i)[0] / summarize(q)[0]
        for vmm in VMMS:
            runs = results.get((vmm, mode))
            if not runs:
                continue
            med, lo, hi = summarize(runs)
            vs = "1.00x" if vmm == "qemu" else (f"{ratios[mode]:.2f}x" if mode in ratios else "-")
            lines.append(f"| {mode} | {vmm} | {med:,.1f} | {lo:,.1f} | {hi:,.1f} | {unit} | {vs} |")
    lines.append("")
    for mode, r in ratios.items():
        verdict = "meets" if r >= TARGET_RATIO else "below"
        lines.append(f"- {mode}: isovisor at **{r:.2f}x** QEMU ({verdict} the "
                     f"{TARGET_RATIO:.1f}x target).")
    for note in NOTES:
        lines += ["", note]
    lines += ["", "Host:", ""] + [f"- {k}: {v}" for k, v in facts.items()]
    lines += ["", f"Command: `.venv/bin/python bench/blk.py --runs {args.runs} --seq-rounds "
              f"{args.seq_rounds} --rand-rounds {args.rand_rounds} --wait {args.wait}"
              f"{'' if JAIL else ' --no-jail'}`.",
              END_MARK]
    return "\n".join(lines)


NOTES = [
    "What remains below the target: a 4 KiB request costs the device about 9.5 us of "
    "Python and syscall time on one I/O thread, while QEMU spreads its I/O over its main "
    "loop and about 50 thread-pool workers (per-thread CPU during this guest's rand run: "
    "main loop ~46% of a core, the workers ~50% together, the vCPU thread 100% in both "
    "VMMs); how much that parallelism wins depends on how busy the shared host is, so "
    "the rand ratio moves from window to window: the five full runs (this command) "
    "before the one above, 2026-11-26 21:22-21:38 UTC, gave rand 0.61x, 0.68x, 0.84x, "
    "1.19x and 1.06x, seq 0.27x, 0.43x, 0.41x, 0.44x and 0.47x. A 64 KiB request is "
    "mostly the kernel copying from the page cache (~63% of the I/O thread's time is "
    "system time in seq), which QEMU runs on several threads at once.",
    "What the request path costs (`bench/blk_path.py`: the device alone, in process, on "
    "a synthetic queue laid out as this guest's; cProfile for the split): a 4 KiB read "
    "takes about 9.5 us of CPU, down from 40 us: walking and validating the chain "
    "(~25%), parsing (~10%), preadv (~15-35%), status byte and used ring (~10%), the "
    "batch loop. What made it 4x faster: each descriptor is range-checked once, in the "
    "chain walker, and carries its memfd offset on (`GuestMemory.ram`), so header, data "
    "views and status need no second check (`check_range` went from ~14 calls per request "
    "to 4: one per descriptor and the status byte); the rings are checked at queue setup "
    "and then read and written by offset; "
    "`pop_heads` takes the whole available ring per notify; no chain object and no "
    "generator per request; `parse_common` handles header/data/status IN and OUT in one "
    "step (a property test holds it to the general parser). A 64 KiB read is dominated "
    "by preadv's copy out of the page cache, ~18-20 us on this host, which no "
    "Python-side change shortens.",
    "The jailed worker was 2x slower than `--no-jail` because of its CPU quota, not "
    "seccomp: the worker's cgroup had one core per vCPU for all its threads, and on this "
    "PVM host the guest's vCPU alone takes a whole core (its 50 us APIC timer ticks are "
    "emulated kernel code), so the device I/O thread starved: 58 of 60 CFS periods "
    "throttled. The quota is now vCPUs + 1 core for the VMM's own threads "
    "(`isovisor/worker/cgroups.py`, VMM_THREAD_CORES). With it, jailed and `--no-jail` "
    "runs differ by no more than run-to-run noise (one window, 2 runs each: rand 30,000 "
    "and 49,100 IOPS jailed, 33,700 and 45,200 unjailed), so the seccomp filters on the "
    "device thread (one syscall per request, preadv) cost nothing measurable here.",
    "Tried and left out, because measurements did not support them: a thread pool for "
    "preadv (in process, 64 KiB reads from the page cache: 1.56 GB/s from one thread, "
    "0.58 and 0.73 GB/s from pools of 2 and 3: the GIL hand-offs cost more than the "
    "parallel copies gain on 2 cores), and busy-polling the available ring for 200 us "
    "after each batch (unjailed, 4 runs each: rand 43,900 IOPS without, 42,100 with).",
    "The guest waits with `hlt` (`--wait hlt`): with `--wait poll` its spinning vCPU "
    "takes one of the host's two cores from the VMM's I/O thread, which costs isovisor "
    "far more than QEMU. QEMU's own figures move by 2x between runs on this shared host "
    "(min and max above).",
]


def write_results(block: str, path: Path = RESULTS) -> None:
    write_block(BEGIN_MARK, END_MARK, block, path)


# --- main ----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="virtio-blk MB/s and IOPS, isovisor vs QEMU.")
    p.add_argument("--runs", type=positive, default=5, help="runs per VMM and mode (5)")
    p.add_argument("--seq-rounds", type=positive, default=600,
                   help="rounds of 64 x 64 KiB reads per seq run (600 = 2.4 GiB)")
    p.add_argument("--rand-rounds", type=positive, default=600,
                   help="rounds of 64 x 4 KiB reads per rand run (600 = 38400 reads)")
    p.add_argument("--mode", choices=["seq", "rand", "both"], default="both")
    p.add_argument("--wait", choices=["hlt", "poll"], default="hlt",
                   help="how the guest's vCPU waits for a round: hlt (default; the local "
                   "APIC timer wakes it every 50 us) or poll (spins, taking a host core)")
    p.add_argument("--qemu", default=QEMU)
    p.add_argument("--timeout", type=float, default=180.0, help="seconds per VMM run")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    p.add_argument("--no-jail", action="store_true",
                   help="run isovisor without its jailed worker (the default without root)")
    args = p.parse_args(argv)
    global JAIL
    JAIL = JAIL and not args.no_jail
    try:
        check_tools(args.qemu)
        elf = build_guest(GUEST_ASM, GUEST_LD)
        facts = host_facts(args.qemu)
        modes = list(MODES) if args.mode == "both" else [args.mode]
        results: dict[tuple[str, str], list[Run]] = {}
        with tempfile.TemporaryDirectory(prefix="isovisor-blkbench-") as tmp:
            image = make_image(Path(tmp) / "bench.img")
            for i in range(args.runs):
                for mode in modes:
                    rounds = args.seq_rounds if mode == "seq" else args.rand_rounds
                    for vmm in VMMS if i % 2 == 0 else VMMS[::-1]:
                        run = measure(vmm, mode, rounds, elf, image, args.timeout, args.qemu,
                                      args.wait)
                        results.setdefault((vmm, mode), []).append(run)
                        print(f"run {i + 1}: {vmm:8} {mode:4} {run.seconds:7.3f} s  "
                              f"{run.value:12,.1f} {MODES[mode][0]}", flush=True)
    except BenchError as exc:
        print(f"bench/blk.py: {exc}", file=sys.stderr)
        return 1
    block = markdown_block(results, facts, args)
    print(block)
    if not args.no_write:
        write_results(block)
        print(f"wrote the blk section of {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
