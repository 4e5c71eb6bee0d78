"""Crash safety: SIGKILL a writer at random points during a burst of concurrent appends,
restart it, and prove every acknowledged append is present and the chain verifies.

A SIGKILL loses nothing the kernel has accepted, so this proves the writer never
acknowledges before its write and never leaves a chain it cannot resume; that the
acknowledged bytes also survive a power loss rests on the fsync before the acknowledgement
(tests/security/audit/test_log.py checks that every durable append waits for one).
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from isovisor.security.audit import AuditConfig, AuditLog, Status, verify_log
from isovisor.security.audit.export import read_entries
from isovisor.security.audit.keys import generate_key
from tests.security.audit.helpers import REPO

ROUNDS = 3
THREADS = 4


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"writer did not say {marker!r}; got {buf[-200:]!r}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            assert chunk, f"writer exited early: {buf[-500:]!r}"
            buf += chunk
    return buf


def test_sigkill_during_concurrent_appends_loses_no_acknowledged_record(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    key = generate_key(keys / "audit.key")
    log_dir = tmp_path / "audit"
    acked: dict[tuple[str, int, int], int] = {}
    for run in range(ROUNDS):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.security.audit.crash_writer", str(log_dir),
             str(keys / "audit.key"), str(THREADS), str(run)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out = _read_until(proc, b"ready\n", 30)
            time.sleep(rng.uniform(0.05, 0.3))  # a random point in the burst
            proc.send_signal(signal.SIGKILL)
            rest, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, err.decode(errors="replace")
        before = len(acked)
        for line in (out + rest).splitlines():
            if line.startswith(b"ack "):
                _, r, t, i, seq = line.decode().split()
                acked[(r, int(t), int(i))] = int(seq)
        assert len(acked) > before, f"run {run} acknowledged nothing (seed {seed})"
        # Between crashes the log may end unsigned or torn, but is never found tampered.
        report = verify_log(log_dir, key.public_key)
        assert report.status is not Status.TAMPERED, (seed, report.lines())

    # Restart once more: recovery resumes the chain and the closed log verifies completely.
    AuditLog(AuditConfig(log_dir), key).close()
    report = verify_log(log_dir, key.public_key)
    assert report.status is Status.VERIFIED, (seed, report.lines())
    found = {(e.fields["data"]["run"], e.fields["data"]["t"], e.fields["data"]["i"]): e.seq
             for _, e in read_entries(log_dir) if e.kind == "crash.rec"}
    missing = [k for k in acked if k not in found]
    assert not missing, f"acknowledged but missing (seed {seed}): {missing[:5]}"
    assert all(found[k] == seq for k, seq in acked.items()), f"seq changed (seed {seed})"
    opened = [e for _, e in read_entries(log_dir) if e.kind == "audit.opened"]
    assert [e.fields["data"]["unclean"] for e in opened] == [False] + [True] * ROUNDS
    print(f"seed {seed}: {len(acked)} acknowledged appends over {ROUNDS} kills")

