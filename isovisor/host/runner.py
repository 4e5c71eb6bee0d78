"""How the daemon runs a VM: the `VmRunner` interface and its first implementation,
`SubprocessRunner`, which starts `isovisor run` under a small monitor process.

The interface is all the daemon knows of VM processes, so the jailed-worker launcher can
replace this implementation without touching the lifecycle code. A `VmHandle` is plain
data that the daemon stores in SQLite and hands back to `adopt` after a restart."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from isovisor.host import monitor
from isovisor.host.errors import RunnerError

CONSOLE_LOG = "console.log"
SECURITY_EVENTS = "events.jsonl"  # the VMM's security events channel (docs/AUDIT.md)
VM_ID_ENV = "ISOVISOR_VM_ID"  # marks every process of a VM (see vm_pids)
# How long `start` waits for the monitor to report the VMM's pid.
SPAWN_TIMEOUT = 10.0

# `isovisor run` exit statuses (README, vmm.stop.StopReason) as stop reasons.
EXIT_REASONS = {
    0: "the guest reset",
    1: "the VMM could not start the guest (see vmm.log)",
    2: "the VMM was given a bad option",
    10: "triple fault",
    11: "the guest powered off",
    12: "the guest crashed",
    13: "KVM could not run the guest (emulation or internal error)",
    14: "stopped by the host",
    15: "a fault inside the VMM",
}


@dataclass(frozen=True)
class Launch:
    """What to run: everything resolved to host paths by the daemon."""

    vm_id: str
    kernel: Path
    vcpus: int
    memory_mib: int
    initrd: Path | None = None
    cmdline: str = ""
    disks: tuple[tuple[Path, bool], ...] = ()  # (path, readonly)
    # per disk: its AES-XTS-256 key (encrypted at rest) or None; handed to `isovisor run`
    # through a pipe on its stdin (`--disk PATH,keyfd=0`), never through a file
    disk_keys: tuple[bytes | None, ...] = field(default=(), repr=False)
    rng: bool = False
    nets: tuple[str, ...] = ()  # `--net` values: TAPs of tenant networks (isovisor.host.network)


@dataclass(frozen=True)
class VmHandle:
    """Enough to find a VM's process again after a daemon restart."""

    pid: int  # the monitor
    start_ticks: int  # its start time (/proc/PID/stat field 22): guards against pid reuse
    run_dir: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> VmHandle:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class VmExit:
    status: int | None  # `isovisor run`'s exit status; negative: killed by that signal
    reason: str


@dataclass
class VmMetrics:
    cpu_seconds: float = 0.0
    rss_bytes: int = 0
    console_bytes: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class VmRunner(Protocol):
    def start(self, launch: Launch) -> VmHandle: ...
    def stop(self, handle: VmHandle, timeout: float) -> None: ...
    def pause(self, handle: VmHandle) -> None: ...
    def resume(self, handle: VmHandle) -> None: ...
    def adopt(self, handle: VmHandle) -> bool: ...
    def alive(self, handle: VmHandle) -> bool: ...
    def exit_info(self, handle: VmHandle) -> VmExit: ...
    def console_path(self, handle: VmHandle) -> Path: ...
    def send_console(self, handle: VmHandle, data: bytes) -> None: ...
    def metrics(self, handle: VmHandle) -> VmMetrics: ...


def describe_exit(status: int | None) -> str:
    if status is None:
        return "the VM's monitor vanished; how the VM ended is unknown"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"the VMM was killed by {name}"
    return EXIT_REASONS.get(status, f"the VMM exited with status {status}")


def proc_start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def default_command(launch: Launch, console: Path) -> list[str]:
    """`isovisor run` for this launch (the jailed worker replaces this in one place)."""
    # -B: a VMM writes no bytecode (the signed manifest lists the bytecode it may load)
    cmd = [sys.executable, "-B", "-m", "isovisor.cli.main", "run", "--kernel",
           str(launch.kernel),
           "--memory", f"{launch.memory_mib}M", "--vcpus", str(launch.vcpus),
           "--serial", f"file:{console}",
           "--serial-input", f"unix:{monitor.SERIAL_SOCKET}",  # relative to RUN_DIR
           "--security-events", SECURITY_EVENTS]
    if launch.initrd is not None:
        cmd += ["--initrd", str(launch.initrd)]
    if launch.cmdline:
        cmd += ["--cmdline", launch.cmdline]
    for i, (path, readonly) in enumerate(launch.disks):
        keyed = i < len(launch.disk_keys) and launch.disk_keys[i] is not None
        cmd += ["--disk", f"{path}{',readonly' if readonly else ''}{',keyfd=0' if keyed else ''}"]
    if launch.rng:
        cmd.append("--rng")
    for net in launch.nets:
        cmd += ["--net", net]
    return cmd


def _key_pipe(keys: bytes) -> int:
    """A pipe's read end holding `keys` (at most 8 x 64 bytes: far below the pipe buffer,
    so the write never blocks), the write end closed: the VMM reads them once."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(w, keys)
    finally:
        os.close(w)
    return r


class SubprocessRunner:
    def __init__(self, run_root: Path,
                 command: Callable[[Launch, Path], list[str]] = default_command) -> None:
        self.run_root = run_root.resolve()
        self.command = command
        run_root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def start(self, launch: Launch) -> VmHandle:
        run_dir = self.run_root / launch.vm_id
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(mode=0o700)
        console = run_dir / CONSOLE_LOG
        console.touch(mode=0o600)
        argv = [sys.executable, "-I", "-S", monitor.__file__, str(run_dir), "--",
                *self.command(launch, console)]
        env = {k: v for k, v in os.environ.items()
               if k in ("PATH", "LANG", "PYTHONPATH") or k.startswith("ISOVISOR_")}
        env[VM_ID_ENV] = launch.vm_id
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # and so does everything it starts
        keys = b"".join(k for k in launch.disk_keys if k is not None)
        stdin = _key_pipe(keys) if keys else subprocess.DEVNULL
        try:
            with open(run_dir / "monitor.log", "wb") as log:
                status = subprocess.run(argv, stdin=stdin,
                                        stdout=subprocess.DEVNULL, stderr=log,
                                        start_new_session=True, close_fds=True, env=env,
                                        cwd=run_dir, timeout=SPAWN_TIMEOUT).returncode
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RunnerError(f"cannot start the VM monitor: {exc}") from exc
        finally:
            if keys:
                os.close(stdin)
        try:
            pid = int((run_dir / monitor.MONITOR_PID).read_text())
        except (OSError, ValueError):
            raise RunnerError(f"the VM monitor did not start (status {status}; see "
                              f"{run_dir}/monitor.log)") from None
        ticks = proc_start_ticks(pid)
        handle = VmHandle(pid, ticks if ticks is not None else -1, str(run_dir))
        deadline = time.monotonic() + SPAWN_TIMEOUT
        while self._vmm_pid(handle) is None:
            if not self.alive(handle):
                raise RunnerError("the VM monitor exited before starting the VMM (see "
                                  f"{run_dir}/monitor.log)")
            if time.monotonic() > deadline:
                self._kill(handle)
                raise RunnerError("the VM monitor did not start the VMM in time")
            time.sleep(0.002)
        return handle

    def _vmm_pid(self, handle: VmHandle) -> int | None:
        try:
            return int((Path(handle.run_dir) / monitor.CHILD_PID).read_text())
        except (OSError, ValueError):
            return None

    def _signal(self, pid: int | None, sig: int) -> None:
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    def alive(self, handle: VmHandle) -> bool:
        return proc_start_ticks(handle.pid) == handle.start_ticks

    def adopt(self, handle: VmHandle) -> bool:
        """True when the handle's monitor still runs (same pid, same start time, our
        monitor for that run directory)."""
        if proc_start_ticks(handle.pid) != handle.start_ticks:
            return False
        try:
            cmdline = Path(f"/proc/{handle.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return handle.run_dir.encode() in cmdline and monitor.__file__.encode() in cmdline

    def vm_pids(self, handle: VmHandle) -> list[int]:
        """Every process of the VM but its monitor: the VMM and whatever it started (the
        jailed worker runs in sessions and PID namespaces of its own, so neither the process
        tree nor a process group reaches it; the ISOVISOR_VM_ID marker in the environment
        that every one of them inherits does)."""
        marker = f"{VM_ID_ENV}={Path(handle.run_dir).name}".encode()
        pids = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == handle.pid:
                continue
            try:
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    env = f.read()
            except OSError:
                continue
            if marker in env.split(b"\0"):
                pids.append(int(entry.name))
        return pids

    def pause(self, handle: VmHandle) -> None:
        """SIGSTOP every process of the VM: its vCPU threads stop where they are."""
        for pid in self.vm_pids(handle):
            self._signal(pid, signal.SIGSTOP)

    def resume(self, handle: VmHandle) -> None:
        for pid in self.vm_pids(handle):
            self._signal(pid, signal.SIGCONT)

    def stop(self, handle: VmHandle, timeout: float) -> None:
        """SIGTERM (the VMM stops its vCPUs and exits 14); SIGKILL after `timeout`."""
        if not self.alive(handle):
            return
        self._signal(handle.pid, signal.SIGTERM)
        self.resume(handle)  # a paused VM must run to stop cleanly
        if self._wait(handle, timeout):
            return
        self._kill(handle)
        self._wait(handle, timeout)

    def _kill(self, handle: VmHandle) -> None:
        self._signal(self._vmm_pid(handle), signal.SIGKILL)
        if self.alive(handle):
            self._signal(handle.pid, signal.SIGKILL)

    def _wait(self, handle: VmHandle, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive(handle):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def exit_info(self, handle: VmHandle) -> VmExit:
        try:
            status = json.loads((Path(handle.run_dir) / monitor.EXIT_FILE).read_text())
            code: int | None = int(status["returncode"])
        except (OSError, ValueError, KeyError, TypeError):
            code = None
        return VmExit(code, describe_exit(code))

    def console_path(self, handle: VmHandle) -> Path:
        return Path(handle.run_dir) / CONSOLE_LOG

    def send_console(self, handle: VmHandle, data: bytes) -> None:
        """Hand console input to the VM's monitor, which relays it to COM1."""
        try:
            # through a directory fd: socket paths are limited to 108 bytes
            dir_fd = os.open(handle.run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(5.0)
                    s.connect(f"/proc/self/fd/{dir_fd}/{monitor.INPUT_SOCKET}")
                    s.sendall(data)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise RunnerError(f"cannot deliver console input: {exc.strerror or exc}") from exc

    def metrics(self, handle: VmHandle) -> VmMetrics:
        """CPU time and resident memory summed over the VM's processes."""
        m = VmMetrics()
        with contextlib.suppress(OSError):
            m.console_bytes = self.console_path(handle).stat().st_size
        tick, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
        for pid in self.vm_pids(handle):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                statm = Path(f"/proc/{pid}/statm").read_text().split()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            m.cpu_seconds += (int(fields[11]) + int(fields[12])) / tick
            m.rss_bytes += int(statm[1]) * page
        return m
