"""Run `isovisor run` as a subprocess the way a user does, feeding COM1 when asked."""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.guests.expectations import Scenario

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunResult:
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")


def isovisor_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "isovisor.cli.main", *args]


def run_isovisor(
    args: list[str],
    *,
    timeout: float,
    send_after: tuple[str, bytes] | None = None,
) -> RunResult:
    """Run `isovisor <args>`; when stdout shows a line matching send_after[0], write
    send_after[1] to its stdin. Kills the process (and fails loudly) on timeout."""
    proc = subprocess.Popen(
        isovisor_cmd(*args),
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
    )
    assert proc.stdin and proc.stdout and proc.stderr
    out = bytearray()
    err = bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    pending = send_after
    deadline = time.monotonic() + timeout
    open_streams = 2
    while open_streams:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            proc.communicate()
            raise AssertionError(
                f"isovisor {' '.join(args)} did not finish in {timeout} s; output so far:\n"
                + out.decode("utf-8", "replace")[-3000:]
            )
        for key, _ in sel.select(min(left, 0.5)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            key.data.extend(chunk)
        if pending is not None and re.search(pending[0], out.decode("utf-8", "replace")):
            proc.stdin.write(pending[1])
            proc.stdin.flush()
            pending = None
    sel.close()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()
    rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    return RunResult(rc, bytes(out), err.decode("utf-8", "replace"))


def scenario_args(elf: Path, sc: Scenario, *extra: str) -> list[str]:
    return [
        "run", "--kernel", str(elf), "--cmdline", sc.cmdline, "--vcpus", str(sc.vcpus),
        "--memory", f"{sc.memory_mib}M", *extra,
    ]
