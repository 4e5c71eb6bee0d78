"""The per-VM monitor: `python -m isovisor.host.monitor RUN_DIR -- COMMAND...`.

It starts the VMM process, records its pid, forwards SIGTERM to it, waits, and writes the
exit status to RUN_DIR/exit.json. It detaches (double fork, own session), so it and its
VM outlive a daemon restart; the restarted daemon re-adopts it and still learns how the
VM ended (as conmon does for containers).

It also owns the VM's console input: the VMM connects to RUN_DIR/serial.sock (`isovisor
run --serial-input unix:...`), the daemon writes input to RUN_DIR/input.sock, and the
monitor relays it, so input works across daemon restarts too. It imports nothing of
isovisor: it must start fast."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
from pathlib import Path

MONITOR_PID = "monitor.pid"
CHILD_PID = "vmm.pid"
EXIT_FILE = "exit.json"
VMM_LOG = "vmm.log"
SERIAL_SOCKET = "serial.sock"  # the VMM connects here for COM1 input
INPUT_SOCKET = "input.sock"  # the daemon sends console input here
MAX_PENDING_INPUT = 64 << 10  # input held until the VMM connects; more is dropped
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
    run_dir, command = Path(argv[0]).resolve(), argv[2:]
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
    # Relative names (the monitor and the VMM run in RUN_DIR): a socket path is limited
    # to 108 bytes, a state directory is not.
    os.chdir(run_dir)
    serial = _listen(Path(SERIAL_SOCKET))
    inputs = _listen(Path(INPUT_SOCKET))
    log = open(VMM_LOG, "ab")  # noqa: SIM115 (lives as long as the process)
    # stdin: what the daemon gave the monitor, /dev/null or a pipe holding the VM's disk
    # keys (`--disk PATH,keyfd=0`); the monitor lets go of it once the VMM has it.
    child = subprocess.Popen(command, stdin=0, stdout=log, stderr=log,
                             preexec_fn=_die_with_parent, close_fds=True)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    children.append(child)
    _write_atomic(run_dir / CHILD_PID, str(child.pid))
    if stop_requested:  # SIGTERM arrived while the VMM was being spawned
        forward(stop_requested[0], None)
    _relay_until_exit(child, serial, inputs)
    code = child.wait()
    _write_atomic(run_dir / EXIT_FILE, json.dumps({"returncode": code}))
    return 0


def _listen(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    os.chmod(path, 0o600)
    s.listen(4)
    s.setblocking(False)
    return s


def _relay_until_exit(child: subprocess.Popen[bytes], serial: socket.socket,
                      inputs: socket.socket) -> None:
    """Relay console input to the VMM until the VMM exits (its pidfd becomes readable)."""
    sel = selectors.DefaultSelector()
    pidfd = os.pidfd_open(child.pid)
    sel.register(pidfd, selectors.EVENT_READ, "exit")
    sel.register(serial, selectors.EVENT_READ, "serial")
    sel.register(inputs, selectors.EVENT_READ, "inputs")
    vmm: socket.socket | None = None
    pending = b""
    while True:
        for key, _ in sel.select():
            what = key.data
            if what == "exit":
                return
            if what == "serial":
                conn, _ = serial.accept()
                if vmm is not None:
                    conn.close()  # one VMM, one connection
                    continue
                vmm = conn
                vmm.settimeout(2.0)  # a VMM that stops reading must not wedge the monitor
                sel.register(vmm, selectors.EVENT_READ, "vmm")
            elif what == "vmm":
                assert vmm is not None
                if not vmm.recv(4096):  # the VMM closed its end
                    sel.unregister(vmm)
                    vmm.close()
                    vmm = None
                continue
            elif what == "inputs":
                conn, _ = inputs.accept()
                conn.setblocking(True)
                conn.settimeout(2.0)
                sel.register(conn, selectors.EVENT_READ, "input")
                continue
            else:  # input bytes from the daemon
                conn = key.fileobj  # type: ignore[assignment]
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    conn.close()
                    continue
                pending = (pending + data)[:MAX_PENDING_INPUT]
            if vmm is not None and pending:
                try:
                    vmm.sendall(pending)
                except OSError:
                    pass
                pending = b""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
