"""Management API benchmark: create-to-running latency (p50/p99) and creates per second,
against a real isovisord (its own process, mutual TLS on loopback, real VMs).

Writes its section of bench/RESULTS.md between <!-- api:begin --> and <!-- api:end -->.

    .venv/bin/python bench/api.py [--latency-runs 20] [--seconds 5] [--burst 8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from results_block import write_block

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from isovisor.api.client import ApiClient, ClientConfig  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
BEGIN_MARK = "<!-- api:begin -->"
END_MARK = "<!-- api:end -->"
KERNEL = REPO / "guests" / "build" / "echo.elf"  # prints "echo: ready", then waits
READY = b"echo: ready"
READY_TIMEOUT = 60.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Daemon:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "isovisor.host.daemon", "--state-dir", str(state),
             "--listen", "127.0.0.1:0", "--bootstrap-admin", "bench"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        m = re.search(r"listening on (https://\S+)", line)
        if not m:
            self.proc.kill()
            raise SystemExit(f"isovisord did not start: {line}{self.proc.stdout.read()}")
        self.endpoint = m.group(1)
        self.proc.stdout.readline()  # the Host Admin line
        self.config = ClientConfig(self.endpoint, state / "ca" / "ca.crt",
                                   state / "admin" / "bench.crt", state / "admin" / "bench.key")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def wait_ready(client: ApiClient, vm: str) -> float:
    deadline = time.monotonic() + READY_TIMEOUT
    seen = b""
    while time.monotonic() < deadline:
        r = client.raw("GET", f"/v1/tenants/bench/vms/{vm}/console",
                       params={"offset": len(seen), "wait": 5})
        seen += r.content
        if READY in seen:
            return time.perf_counter()
    raise SystemExit(f"VM {vm} printed no ready line in {READY_TIMEOUT} s")


def latency(client: ApiClient, runs: int) -> tuple[list[float], list[float]]:
    to_running, to_guest = [], []
    for i in range(runs):
        name = f"lat-{i}"
        t0 = time.perf_counter()
        vm = client.post("/v1/tenants/bench/vms", json={
            "name": name, "kernel": "echo", "memoryMiB": 64, "vcpus": 1})
        t1 = time.perf_counter()
        assert vm["state"] == "running", vm
        t2 = wait_ready(client, name)
        to_running.append((t1 - t0) * 1000)
        to_guest.append((t2 - t0) * 1000)
        client.delete(f"/v1/tenants/bench/vms/{name}")
    return to_running, to_guest


def api_creates(config: ClientConfig, seconds: float, threads: int) -> tuple[int, float]:
    """Creates with start=false (API, RBAC, quota transaction, SQLite) from `threads`
    concurrent clients for `seconds`."""
    count = [0] * threads
    stop_at = time.perf_counter() + seconds

    def work(k: int) -> None:
        with ApiClient(config) as c:
            i = 0
            while time.perf_counter() < stop_at:
                c.post("/v1/tenants/bench/vms", json={
                    "name": f"s{k}-{i}", "kernel": "echo", "memoryMiB": 16, "start": False})
                i += 1
            count[k] = i

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(count), time.perf_counter() - t0


def burst(config: ClientConfig, n: int) -> tuple[float, float]:
    """n creates with start=true issued at once (2 clients): seconds until every POST
    returned running, and until every guest printed its ready line."""
    names = [f"b-{i}" for i in range(n)]
    t0 = time.perf_counter()
    done: list[float] = []

    def work(part: list[str]) -> None:
        with ApiClient(config) as c:
            for name in part:
                c.post("/v1/tenants/bench/vms", json={
                    "name": name, "kernel": "echo", "memoryMiB": 64})
                done.append(time.perf_counter())

    ts = [threading.Thread(target=work, args=(names[k::2],)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    posted = max(done) - t0
    with ApiClient(config) as c:
        ready = max(wait_ready(c, name) for name in names) - t0
        for name in names:
            c.delete(f"/v1/tenants/bench/vms/{name}")
    return posted, ready


def write_results(block: str) -> None:
    write_block(BEGIN_MARK, END_MARK, block, RESULTS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--burst", type=int, default=8)
    p.add_argument("--no-write", action="store_true", help="print, do not touch RESULTS.md")
    args = p.parse_args(argv)
    if not KERNEL.is_file():
        raise SystemExit(f"{KERNEL} is missing: run `make guests`")
    load = os.getloadavg()
    daemon = Daemon(Path(tempfile.mkdtemp(prefix="isovisor-bench-api-")))
    try:
        with ApiClient(daemon.config) as admin:
            admin.post("/v1/tenants", json={"name": "bench", "quota": {
                "maxVcpus": 4096, "maxMemoryMiB": 1 << 24, "maxVms": 100000}})
            admin.put("/v1/tenants/bench/images/echo", content=KERNEL.read_bytes(),
                      headers={"content-type": "application/octet-stream"})
            admin.get("/v1/whoami")
            to_running, to_guest = latency(admin, args.latency_runs)
        creates, elapsed = api_creates(daemon.config, args.seconds, args.threads)
        posted, ready = burst(daemon.config, args.burst)
    finally:
        daemon.stop()
    rate = creates / elapsed
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO).stdout.strip()
    lines = [
        BEGIN_MARK,
        "## Management API: create-to-running latency and creates per second (`bench/api.py`)",
        "",
        "A real isovisord in its own process (`python -m isovisor.host.daemon`), its API on "
        "loopback over mutual TLS 1.3, one keep-alive client connection per client thread. "
        "Guest: `guests/build/echo.elf`, 64 MiB, 1 vCPU. *Running* = the POST returned with "
        "the VM running (VMM process spawned, state in SQLite); *guest output* = the guest's "
        "first serial line (`echo: ready`) read back through the console API. Each latency "
        "run creates one VM, waits for its line, and deletes it.",
        "",
        "| measure | n | p50 | p99 | mean |",
        "|---|---:|---:|---:|---:|",
        f"| create → running (ms) | {len(to_running)} | {pct(to_running, .5):.1f} | "
        f"{pct(to_running, .99):.1f} | {statistics.mean(to_running):.1f} |",
        f"| create → guest output (ms) | {len(to_guest)} | {pct(to_guest, .5):.1f} | "
        f"{pct(to_guest, .99):.1f} | {statistics.mean(to_guest):.1f} |",
        "",
        f"- Sustained creates (start=false: TLS, RBAC, quota transaction, SQLite): "
        f"**{rate:.0f} creates/s** ({creates} in {elapsed:.1f} s, {args.threads} clients).",
        f"- Burst of {args.burst} creates with start=true (2 clients): all running after "
        f"{posted:.2f} s (**{args.burst / posted:.1f} VM starts/s**); every guest printed "
        f"after {ready:.2f} s ({args.burst / ready:.1f} VMs/s to guest output).",
        "",
        f"Host: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {platform.release()}, "
        f"{os.cpu_count()} CPUs, load {load[0]:.2f} at start, isovisor commit {commit}.",
        "",
        f"Command: `.venv/bin/python bench/api.py --latency-runs {args.latency_runs} "
        f"--seconds {args.seconds:g} --threads {args.threads} --burst {args.burst}`.",
        END_MARK,
    ]
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        write_results(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
