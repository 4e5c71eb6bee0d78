#!/usr/bin/env python3
"""Exit round trips per second: isovisor against QEMU, on the same guest, in one run.

The guest (bench/guests/exitloop.asm, a PVH ELF) prints `exitloop: start`, performs N
port-I/O reads (`in al, dx` from an unclaimed port) or N MMIO reads (4 bytes from an
unmapped address in the MMIO hole), then prints `exitloop: done ...` and resets. Every
access is a KVM exit to the VMM's userspace and back. This script reads each VMM's stdout
as it arrives, timestamps it, and takes the loop's duration as the time from the end of
the start line to the first byte of the done line. Runs alternate between the two VMMs
(the order flips every round, so drift on a shared host hits both), and the median,
min and max exits/second of each go into a table and into bench/RESULTS.md.

    .venv/bin/python bench/exits.py [--n 20000] [--runs 5] [--mode pio|mmio|both] [--no-write]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
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

BENCH = REPO / "bench"
GUEST_ASM = BENCH / "guests" / "exitloop.asm"
GUEST_LD = BENCH / "guests" / "exitloop.ld"
RESULTS = BENCH / "RESULTS.md"
BEGIN_MARK = "<!-- exits:begin -->"
END_MARK = "<!-- exits:end -->"

QEMU = "qemu-system-x86_64"
MEMORY_MIB = 64
TARGET_RATIO = 0.9  # the bar: isovisor at least 0.9x QEMU's exit rate
MODES = ("pio", "mmio")
VMMS = ("isovisor", "qemu")

START_LINE = b"exitloop: start"
DONE_PREFIX = b"exitloop: done"
ERROR_PREFIX = b"exitloop: error"


@dataclass(frozen=True)
class Run:
    vmm: str
    mode: str
    n: int
    seconds: float  # the timed loop
    wall: float  # process start to process exit

    @property
    def rate(self) -> float:
        return self.n / self.seconds


@dataclass(frozen=True)
class Summary:
    vmm: str
    mode: str
    median: float
    low: float
    high: float
    runs: int

    @property
    def us_per_exit(self) -> float:
        return 1e6 / self.median


# --- set-up --------------------------------------------------------------------------


def vmm_command(vmm: str, elf: Path, cmdline: str, timeout: float, qemu: str) -> list[str]:
    if vmm == "isovisor":
        return [
            isovisor_python(), "-m", "isovisor.cli.main", "run",
            "--kernel", str(elf), "--cmdline", cmdline, "--memory", f"{MEMORY_MIB}M",
            "--timeout", f"{timeout:g}",
        ]
    return [
        qemu, "-M", "microvm,x-option-roms=off,isa-serial=on", "-accel", "kvm",
        "-m", str(MEMORY_MIB), "-nodefaults", "-no-user-config", "-nographic",
        "-serial", "stdio", "-no-reboot", "-kernel", str(elf), "-append", cmdline,
    ]


# --- one run -------------------------------------------------------------------------


def measure(
    vmm: str, mode: str, n: int, elf: Path, timeout: float, qemu: str
) -> Run:
    cmd = vmm_command(vmm, elf, f"mode={mode} n={n}", timeout, qemu)
    out, chunks, rc, stderr, wall = timed_output(cmd, timeout + 10)
    text = out.decode(errors="replace")

    def fail(why: str) -> BenchError:
        return BenchError(
            f"{vmm} ({mode}, n={n}): {why}\ncommand: {shlex.join(cmd)}\nexit status: {rc}\n"
            f"stdout:\n{text.strip()}\nstderr:\n{stderr}"
        )

    if ERROR_PREFIX in out:
        raise fail("the guest reported an error")
    s = out.find(START_LINE)
    if s < 0:
        raise fail("the guest never printed its start line")
    start_nl = out.find(b"\n", s)
    d = out.find(DONE_PREFIX, s)
    if start_nl < 0 or d < 0 or out.find(b"\n", d) < 0:
        raise fail("the guest never printed its done line")
    if rc != 0:
        raise fail("the VMM exited with a nonzero status after the guest reset")
    # From the arrival of the start line's end to the arrival of the done line's first byte:
    # the loop, plus the handful of interpreted instructions and the one LSR poll between.
    seconds = time_at(chunks, d) - time_at(chunks, start_nl)
    if seconds <= 0:
        raise fail(
            "start and done lines arrived in the same read (loop too short to time; "
            "raise --n)"
        )
    return Run(vmm, mode, n, seconds, wall)


# --- reporting -----------------------------------------------------------------------


def summarize(runs: Sequence[Run]) -> Summary:
    rates = [r.rate for r in runs]
    return Summary(runs[0].vmm, runs[0].mode, statistics.median(rates), min(rates), max(rates),
                   len(rates))


def ratio(summaries: dict[tuple[str, str], Summary], mode: str) -> float | None:
    iso, qemu = summaries.get(("isovisor", mode)), summaries.get(("qemu", mode))
    if iso is None or qemu is None:
        return None
    return iso.median / qemu.median


def table_rows(summaries: dict[tuple[str, str], Summary]) -> list[list[str]]:
    rows = []
    for mode in MODES:
        r = ratio(summaries, mode)
        for vmm in VMMS:
            s = summaries.get((vmm, mode))
            if s is None:
                continue
            rows.append([
                mode, vmm, f"{s.median:,.0f}", f"{s.low:,.0f}", f"{s.high:,.0f}",
                f"{s.us_per_exit:.2f}",
                (f"{r:.2f}x" if r is not None else "-") if vmm == "isovisor" else "1.00x",
            ])
    return rows


HEADERS = ["mode", "VMM", "median exits/s", "min", "max", "µs/exit", "vs QEMU"]


def plain_table(rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([fmt(HEADERS), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def markdown_block(
    summaries: dict[tuple[str, str], Summary], facts: dict[str, str], n: int, runs: int
) -> str:
    lines = [
        BEGIN_MARK,
        "## Exit round trips: port I/O and MMIO (`bench/exits.py`)",
        "",
        f"Guest `bench/guests/exitloop.asm`: n = {n:,} reads per run, {runs} runs per VMM "
        "and mode, alternating isovisor and QEMU. Rate = n / (time from the end of the "
        "guest's `exitloop: start` line to the first byte of its `exitloop: done` line on "
        "the VMM's stdout). "
        "pio: `in al, dx` from port 0x700; mmio: 4-byte read of 0xD8000000 (both unclaimed "
        "in both VMMs, so every access is a KVM exit to userspace).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---", "---"] + ["---:"] * (len(HEADERS) - 2)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(summaries)]
    lines.append("")
    for mode in MODES:
        r = ratio(summaries, mode)
        if r is not None:
            verdict = "meets" if r >= TARGET_RATIO else "below"
            lines.append(
                f"- {mode}: isovisor runs at **{r:.2f}x** QEMU's rate ({verdict} the "
                f"{TARGET_RATIO}x target)."
            )
    lines += ["", "Host:", ""]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    lines += [
        "",
        f"Command: `.venv/bin/python bench/exits.py --n {n} --runs {runs}` "
        "(`make bench` runs the defaults).",
        END_MARK,
    ]
    return "\n".join(lines)


def write_results(block: str, path: Path = RESULTS) -> None:
    write_block(BEGIN_MARK, END_MARK, block, path)


# --- main ----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Port-I/O and MMIO exit round trips per second, isovisor vs QEMU."
    )
    p.add_argument("--n", type=positive, default=20000, help="reads per run (default 20000)")
    p.add_argument("--runs", type=positive, default=5,
                   help="runs per VMM and mode (default 5)")
    p.add_argument("--mode", choices=["pio", "mmio", "both"], default="both",
                   help="which exit to measure (default both)")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    p.add_argument("--qemu", default=QEMU, help=f"QEMU binary (default {QEMU})")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds one VMM run may take (default 120)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    try:
        check_tools(args.qemu)
        elf = build_guest(GUEST_ASM, GUEST_LD)
        facts = host_facts(args.qemu)
        print(f"host: {facts['KVM']}; {facts['CPU']}; kernel {facts['Kernel']}; "
              f"load {facts['Load average at start']}", flush=True)
        results: dict[tuple[str, str], list[Run]] = {}
        for mode in modes:
            for i in range(args.runs):
                order = VMMS if i % 2 == 0 else VMMS[::-1]
                for vmm in order:
                    run = measure(vmm, mode, args.n, elf, args.timeout, args.qemu)
                    results.setdefault((vmm, mode), []).append(run)
                    print(
                        f"[{mode} {i + 1}/{args.runs}] {vmm:<8} {run.n} exits in "
                        f"{run.seconds:.3f} s = {run.rate:>9,.0f}/s  (process {run.wall:.2f} s)",
                        flush=True,
                    )
    except BenchError as exc:
        print(f"bench/exits.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/exits.py: interrupted", file=sys.stderr)
        return 130

    summaries = {key: summarize(runs) for key, runs in results.items()}
    print()
    print(plain_table(table_rows(summaries)))
    for mode in modes:
        r = ratio(summaries, mode)
        if r is not None:
            verdict = "meets" if r >= TARGET_RATIO else "BELOW"
            print(f"{mode}: isovisor/QEMU = {r:.2f}x ({verdict} the {TARGET_RATIO}x target)")
    if args.no_write:
        print("--no-write: bench/RESULTS.md left alone")
    else:
        write_results(markdown_block(summaries, facts, args.n, args.runs))
        print(f"wrote {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
