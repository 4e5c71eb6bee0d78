"""Per-VM memory and start time of jailed workers: 16 idle VMs from one zygote.

For each worker (the VM process, pid 1 of its PID namespace) this reads
/proc/PID/smaps_rollup (USS = Private_Clean + Private_Dirty, PSS, RSS) and, from
/proc/PID/smaps, how much of that is guest RAM (the memfd mapping) rather than VMM
overhead. Start time is measured at the launcher: "fork" = launch request sent -> the
zygote reports the VM process's pid; "ready" = launch request sent -> the worker says
every jail step passed (VM built, kernel loaded, jailed, seccomp on, vCPU started).
The first launch also pays for starting the zygote (reported apart).

Writes its section of bench/RESULTS.md between <!-- worker:begin --> and
<!-- worker:end -->. Needs root and /dev/kvm. Run: .venv/bin/python bench/worker_memory.py
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from results_block import write_block

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from isovisor.worker.cgroups import MEMORY_OVERHEAD  # noqa: E402
from isovisor.worker.launcher import Launcher, LaunchRequest, WorkerHandle  # noqa: E402
from tests.worker.guests import build_idle_guest  # noqa: E402

RESULTS = BENCH / "RESULTS.md"
BEGIN_MARK = "<!-- worker:begin -->"
END_MARK = "<!-- worker:end -->"
KiB = 1024
MiB = 1024 * 1024
TARGET_USS = 5 * MiB  # Firecracker's published VMM overhead per VM
GUEST_RAM_MAPPING = "memfd:isovisor-guest-ram"
SETTLE_S = 2.0  # let every idle guest reach its HLT and the workers go quiet

def rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[key] = int(fields[0]) * KiB
    return out


def guest_ram_private(pid: int) -> int:
    """Private bytes of the guest RAM mapping (pages only this worker maps)."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = GUEST_RAM_MAPPING in line
        elif inside and line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(line.split()[1]) * KiB
    return total


def measure(h: WorkerHandle) -> dict[str, float]:
    r = rollup(h.pid)
    uss = r["Private_Clean"] + r["Private_Dirty"]
    ram = guest_ram_private(h.pid)
    return {"uss": uss, "pss": r["Pss"], "rss": r["Rss"], "guest_ram": ram,
            "overhead_uss": uss - ram, "start_ms": h.start_ms, "ready_ms": h.ready_ms,
            "threads": len(os.listdir(f"/proc/{h.pid}/task"))}


def mib(v: float) -> str:
    return f"{v / MiB:.2f}"


def render(rows: list[dict[str, float]], zygote: dict[str, int], first_ms: float,
           prepare_ms: float, memory: int) -> str:
    def col(k: str) -> list[float]:
        return [r[k] for r in rows]

    def stats(k: str, fmt: Callable[[float], str] = mib) -> str:
        v = col(k)
        return f"{fmt(statistics.median(v))} | {fmt(min(v))} | {fmt(max(v))}"

    def ms(v: float) -> str:
        return f"{v:.1f}"

    over = statistics.median(col("overhead_uss"))
    verdict = "meets" if over <= TARGET_USS else "misses"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    lines = [
        BEGIN_MARK,
        "## Jailed worker memory and start time (`bench/worker_memory.py`)",
        "",
        f"{len(rows)} idle VMs ({memory // MiB} MiB guest RAM, 1 vCPU, guest "
        "`tests/worker/idle_guest.asm`: one line, then `cli; hlt`), each in its own jailed "
        "worker forked from one zygote, measured together after "
        f"{SETTLE_S:.0f} s. USS = Private_Clean + Private_Dirty of the VM process; "
        "\"guest RAM\" is the part of it in the guest's memfd mapping (pages the guest or "
        "the loader touched); VMM overhead = USS - guest RAM.",
        "",
        "| per worker | median | min | max |",
        "|---|---:|---:|---:|",
        f"| USS, MiB | {stats('uss')} |",
        f"| of which guest RAM, MiB | {stats('guest_ram')} |",
        f"| **VMM overhead (USS - guest RAM), MiB** | {stats('overhead_uss')} |",
        f"| PSS, MiB | {stats('pss')} |",
        f"| RSS, MiB | {stats('rss')} |",
        f"| threads | {stats('threads', lambda v: f'{v:.0f}')} |",
        f"| start: request -> VM process forked, ms | {stats('start_ms', ms)} |",
        f"| start: request -> ready (built, jailed, running), ms | {stats('ready_ms', ms)} |",
        "",
        f"- VMM overhead per VM: median **{mib(over)} MiB**, which {verdict} the 5 MiB "
        "target (Firecracker's published bar).",
        f"- Zygote (shared by all workers): RSS {mib(zygote['Rss'])} MiB, PSS "
        f"{mib(zygote['Pss'])} MiB; started once in {prepare_ms:.0f} ms (imports, "
        "seccomp compilation, one throwaway VM built and closed: isovisor/worker/warmup.py); "
        f"the first launch including it took {first_ms:.0f} ms.",
        "- What the overhead is made of, and what reduced it: docs/WORKER.md, "
        "\"Measurements\".",
        f"- Memory cgroup limit per VM: guest RAM + {MEMORY_OVERHEAD // MiB} MiB.",
        "",
        "Host:",
        "",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Kernel: {platform.release()}",
        f"- CPUs: {os.cpu_count()}",
        f"- Python: {platform.python_version()}",
        f"- isovisor commit: {commit}",
        END_MARK,
    ]
    return "\n".join(lines)


def write_results(block: str, path: Path = RESULTS) -> None:
    write_block(BEGIN_MARK, END_MARK, block, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--vms", type=int, default=16, help="idle VMs at once (default 16)")
    p.add_argument("--memory", type=int, default=64, help="guest RAM in MiB (default 64)")
    p.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, Launcher() as launcher:
        elf = build_idle_guest(Path(tmp))
        t0 = time.perf_counter()
        launcher.start()
        handles: list[WorkerHandle] = []
        try:
            for _ in range(args.vms):
                handles.append(launcher.launch(LaunchRequest(kernel=elf,
                                                             memory=args.memory * MiB)))
                if len(handles) == 1:
                    first_ms = (time.perf_counter() - t0) * 1000
            time.sleep(SETTLE_S)
            rows = [measure(h) for h in handles]
            assert launcher.zygote_pid is not None
            zygote = rollup(launcher.zygote_pid)
        finally:
            for h in handles:
                h.stop("benchmark over")
            for h in handles:
                h.wait(30)
    block = render(rows, zygote, first_ms, float(launcher.zygote_info.get("prepare_ms", 0)),
                   args.memory * MiB)
    print(block)
    if not args.no_write:
        write_results(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
