"""The per-VM monitor: `python -m isovisor.host.monitor RUN_DIR -- COMMAND...`.

It starts the VMM process, records its pid, forwards SIGTERM to it, waits, and writes the
exit status to RUN_DIR/exit.json. It detaches (double fork, own session), so it and its VM
outlive a daemon restart; the restarted daemon re-adopts it and still learns how the VM ended (as
conmon does for containers). It imports nothing of isovisor: it must start fast."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

MONITOR_PID = "monitor.pid"
CHILD_PID = "vmm.pid"
EXIT_FILE = "exit.json"
VMM_LOG = "vmm.log"
PR_SET_PDEATHSIG = 1


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _die_with_parent() -> None:
    # The VMM gets SIGKILL if the monitor dies (a VM without its monitor is unmanageable).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m isovisor.host.monitor RUN_DIR -- COMMAND...", file=sys.stderr)
        return 2
    run_dir, command = Path(argv[0]), argv[2:]
    # Detach: the process that started us exits now, so the monitor is nobody's child
    # (init reaps it) and the same whether the daemon that started it still runs or not.
    pid = os.fork()
    if pid:
        _write_atomic(run_dir / MONITOR_PID, str(pid))
        os._exit(0)
    os.setsid()
    children: list[subprocess.Popen[bytes]] = []
    stop_requested: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stop_requested.append(signum)
        for child in children:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    log = open(run_dir / VMM_LOG, "ab")  # noqa: SIM115 (lives as long as the process)
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                             preexec_fn=_die_with_parent, close_fds=True)
    children.append(child)
    _write_atomic(run_dir / CHILD_PID, str(child.pid))
    if stop_requested:  # SIGTERM arrived while the VMM was being spawned
        forward(stop_requested[0], None)
    code = child.wait()
    _write_atomic(run_dir / EXIT_FILE, json.dumps({"returncode": code}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
