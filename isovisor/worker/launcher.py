"""The host side of workers: start the zygote, launch one jailed worker per VM, watch it.

For each VM the launcher leases a uid/gid, creates the VM's cgroups, opens what the VM
needs (/dev/kvm, the kernel and initrd, serial streams, and the backends of its disks,
TAPs and vsock device: isovisor.worker.devices) and hands the zygote only those file
descriptors plus one end of a control socket. For a vsock device it also serves the
worker's requests to connect host sockets (isovisor.worker.vsock_broker). It then waits
for the worker's "ready" (every jail step passed) or "failed" (naming the step). On exit
it removes the cgroups, releases the lease, and turns a seccomp death into a security
event naming the syscall.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import isovisor
from isovisor.devices.events import SecurityEvent, SecurityEventLog
from isovisor.devices.virtio.blk_disk import DiskSpec
from isovisor.devices.virtio.net_spec import NetSpec
from isovisor.devices.virtio.vsock.spec import VsockSpec
from isovisor.kvm import Kvm
from isovisor.kvm.system import KVM_DEVICE
from isovisor.vmm.builder import MAX_INITRD_BYTES, MAX_KERNEL_BYTES
from isovisor.vmm.stop import StopReason
from isovisor.worker import cgroups, protocol, test_hook
from isovisor.worker.config import WorkerConfig
from isovisor.worker.devices import HostDevices
from isovisor.worker.errors import BuildError, JailError, ProtocolError, WorkerError
from isovisor.worker.ids import DEFAULT_LEASE_DIR, IdAllocator, IdLease
from isovisor.worker.security_report import SeccompKill, describe_status, explain_sigsys
from isovisor.worker.zygote import OP_HELLO

log = logging.getLogger(__name__)

ZYGOTE_START_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 60.0  # building a VM includes reading the kernel and initrd
# Security events from a worker: at most this many per control read, and per second.
MAX_EVENTS_PER_CALL = 64
WORKER_EVENTS_PER_SECOND = 20.0
_core_sched_reported = False
CORE_SCHED_MARKER = Path("/run/isovisor/core-sched-reported")


@dataclass
class LaunchRequest:
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""
    memory: int = 256 * 1024 * 1024
    vcpus: int = 1
    protocol: str = "auto"
    serial_out_fd: int | None = None  # the guest's COM1 output; None: discarded
    serial_in_fd: int | None = None  # what feeds COM1; None: nothing
    stderr_fd: int = 2  # where the worker's own log lines go
    serial_rate: float | None = 1024 * 1024
    serial_total_limit: int | None = 1024 * 1024 * 1024
    cpuset: str | None = None
    cpu_cores: float | None = None  # default: one core per vCPU + VMM_THREAD_CORES
    binds: dict[str, str] = field(default_factory=dict)
    test_hook: str | None = None
    vm_id: str | None = None
    rng: bool = False
    disks: tuple[DiskSpec, ...] = ()  # virtio-blk, in order (vda, vdb, ...)
    nets: tuple[NetSpec, ...] = ()  # virtio-net on existing TAPs (in the caller's netns)
    vsock: VsockSpec | None = None  # virtio-vsock; the launcher binds its socket


@dataclass
class WorkerExit:
    pid: int
    status: int  # the wait status
    stopped: dict[str, Any] | None  # the worker's own "stopped" report, if it got there
    seccomp: SeccompKill | None
    failure: JailError | BuildError | None = None

    @property
    def exit_status(self) -> int:
        if self.stopped is not None:
            return int(self.stopped.get("exit_status", StopReason.VMM_ERROR.exit_status))
        return StopReason.VMM_ERROR.exit_status

    def describe(self) -> str:
        if self.stopped is not None:
            return str(self.stopped.get("describe", "stopped"))
        if self.seccomp is not None:
            return f"vmm error: worker {self.seccomp.describe()}"
        return f"vmm error: worker {describe_status(self.status)}"


class Launcher:
    """Starts the zygote on first use; not thread-safe across launches (one caller)."""

    def __init__(self, *, kvm_device: str | None = None,
                 lease_dir: Path = DEFAULT_LEASE_DIR, log_level: int | None = None) -> None:
        self.kvm_device = kvm_device or os.environ.get("ISOVISOR_KVM_DEVICE", KVM_DEVICE)
        self.ids = IdAllocator(lease_dir)
        self.log_level = log_level if log_level is not None else logging.getLogger().level
        self.security_events = SecurityEventLog()
        self._zygote: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._exits: dict[int, int] = {}
        self._lock = threading.RLock()
        self._seq = itertools.count(1)
        self.zygote_info: dict[str, Any] = {}

    # --- the zygote ---------------------------------------------------------------------

    def start(self) -> None:
        if self._sock is not None:
            return
        ours, theirs = protocol.socketpair()
        pkg_root = str(Path(isovisor.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_root, env.get("PYTHONPATH")]))
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        os.set_inheritable(theirs.fileno(), True)
        try:
            self._zygote = subprocess.Popen(
                [sys.executable, "-m", "isovisor.worker.zygote", "--fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, env=env, start_new_session=True,
            )
        finally:
            theirs.close()
        self._sock = ours
        msg = self._recv_zygote(ZYGOTE_START_TIMEOUT_S)
        if msg is None or msg.op != OP_HELLO:
            detail = msg.body.get("detail") if msg is not None else "no answer"
            self.close()
            raise JailError("zygote", f"the zygote did not start: {detail}")
        self.zygote_info = msg.body

    @property
    def zygote_pid(self) -> int | None:
        return self._zygote.pid if self._zygote is not None else None

    def close(self) -> None:
        """Close the zygote socket: the zygote kills any worker left and exits."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._zygote is not None:
            try:
                self._zygote.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
                self._zygote.wait()
            self._zygote = None

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv_zygote(self, timeout: float) -> protocol.Message | None:
        assert self._sock is not None
        ready, _, _ = select.select([self._sock], [], [], timeout)
        if not ready:
            return None
        return protocol.recv(self._sock)

    def _pump(self, timeout: float) -> protocol.Message | None:
        """Read one zygote message; exits are recorded, anything else returned."""
        with self._lock:
            if self._sock is None:
                return None
            msg = self._recv_zygote(timeout)
            if msg is not None and msg.op == protocol.OP_EXITED:
                self._exits[msg.get_int("pid")] = msg.get_int("status")
                return None
            return msg

    def exit_status_of(self, pid: int) -> int | None:
        with self._lock:
            return self._exits.get(pid)

    # --- launching ----------------------------------------------------------------------

    def launch(self, req: LaunchRequest, timeout: float = READY_TIMEOUT_S) -> WorkerHandle:
        """Start a jailed worker for `req`; returns once every jail step has passed.
        Raises BuildError (the VM itself), JailError (naming the step) or WorkerError."""
        if req.test_hook is not None:
            if os.environ.get(test_hook.ENABLE_ENV) != "1":
                raise WorkerError(f"test hooks are disabled (set {test_hook.ENABLE_ENV}=1 "
                                  "in the launcher's environment, for tests only)")
            if not test_hook.valid(req.test_hook):
                raise WorkerError(f"unknown test hook {req.test_hook!r}")
        self.start()
        opened: list[int] = []
        lease: IdLease | None = None
        groups: cgroups.VmCgroups | None = None
        ours: socket.socket | None = None
        theirs: socket.socket | None = None
        devices: HostDevices | None = None
        try:
            fds, fd_index = self._open_inputs(req, opened)
            devices = HostDevices.open(req.disks, req.nets, req.vsock)
            for slot, fd in devices.fds.items():
                fd_index[slot] = len(fds)
                fds.append(fd)
            lease = self.ids.allocate()
            vm_id = req.vm_id or f"vm-{os.getpid()}-{next(self._seq)}"
            limits = cgroups.CgroupLimits.for_vm(req.vcpus, req.memory, req.cpuset)
            if req.cpu_cores is not None:
                limits = cgroups.CgroupLimits(req.cpu_cores, limits.memory_bytes,
                                              limits.pids, limits.cpuset)
            groups = cgroups.create(f"vm-{lease.uid}", limits)
            ours, theirs = protocol.socketpair()
            fd_index["control"] = len(fds)
            fds.append(theirs.fileno())
            cfg = WorkerConfig(
                vm_id=vm_id, uid=lease.uid, gid=lease.gid, memory=req.memory,
                vcpus=req.vcpus, cmdline=req.cmdline, protocol=req.protocol,
                serial_rate=req.serial_rate, serial_total_limit=req.serial_total_limit,
                cgroup_procs=groups.procs_files, tasks_limit=limits.pids, binds=req.binds,
                fd_index=fd_index, test_hook=req.test_hook, log_level=self.log_level,
                rng=req.rng, disks=devices.disks, nets=devices.nets, vsock=devices.vsock,
            )
            t0 = time.perf_counter()
            with self._lock:
                assert self._sock is not None
                protocol.send(self._sock, protocol.OP_LAUNCH, {"config": cfg.to_json()}, fds)
                theirs.close()
                theirs = None
                devices.sent()  # the zygote has its own copies now
                devices.start()  # a vsock device's broker serves from now on
                reply = None
                while reply is None:
                    reply = self._pump(timeout)
                    if reply is None and self._sock is None:
                        raise WorkerError("the zygote went away")
            handle = WorkerHandle(self, vm_id, ours, lease, groups, devices)
            ours = None
            lease = groups = devices = None
            if reply.op != protocol.OP_LAUNCHED:
                handle.pid = -1
                handle._await_failure(reply.body.get("detail", "launch failed"))
            handle.pid = reply.get_int("pid")
            handle.start_ms = (time.perf_counter() - t0) * 1000
            handle._await_ready(timeout)
            handle.ready_ms = (time.perf_counter() - t0) * 1000
            self._report_core_sched(handle.report.get("core_scheduling", ""))
            return handle
        finally:
            for fd in opened:
                os.close(fd)
            for s in (ours, theirs):
                if s is not None:
                    s.close()
            if devices is not None:
                devices.sent()
                devices.finish()
            if groups is not None:
                groups.remove(attempts=1)
            if lease is not None:
                lease.release()

    def _open_inputs(self, req: LaunchRequest, opened: list[int]) -> tuple[list[int],
                                                                           dict[str, int]]:
        fds: list[int] = []
        index: dict[str, int] = {}

        def add(slot: str, fd: int) -> None:
            index[slot] = len(fds)
            fds.append(fd)

        # Kvm checks the device, the API version and the capabilities, and raises
        # KvmUnavailableError with the one-sentence reason the CLI prints.
        with Kvm(self.kvm_device) as checked:
            kvm = os.dup(checked.fd)
        opened.append(kvm)
        add("kvm", kvm)
        add("kernel", _open_image(req.kernel, "kernel", MAX_KERNEL_BYTES, opened))
        if req.initrd is not None:
            add("initrd", _open_image(req.initrd, "initrd", MAX_INITRD_BYTES, opened))
        if req.serial_out_fd is not None:
            add("serial_out", req.serial_out_fd)
        if req.serial_in_fd is not None:
            add("serial_in", req.serial_in_fd)
        add("stderr", req.stderr_fd)
        return fds, index

    def _report_core_sched(self, detail: str) -> None:
        """Core scheduling missing is said once per host boot (and in every report)."""
        global _core_sched_reported
        if _core_sched_reported or not detail or "unavailable" not in detail:
            return
        _core_sched_reported = True
        try:
            fd = os.open(CORE_SCHED_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            return  # already said this boot (or /run not writable: stay quiet)
        os.close(fd)
        log.warning("%s: workers run without a core-scheduling cookie", detail)


def _open_image(path: Path, what: str, limit: int, opened: list[int]) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise BuildError(f"{what} {path} does not exist") from None
    except PermissionError:
        raise BuildError(f"{what} {path} is not readable") from None
    except IsADirectoryError:
        raise BuildError(f"{what} {path} is a directory") from None
    except OSError as exc:
        raise BuildError(f"{what} {path}: {exc.strerror}") from None
    opened.append(fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise BuildError(f"{what} {path} is not a regular file")
    if st.st_size > limit:
        raise BuildError(f"{what} {path} is {st.st_size} bytes; the limit is {limit}")
    return fd


class WorkerHandle:
    """One running worker, as the host sees it."""

    def __init__(self, launcher: Launcher, vm_id: str, control: socket.socket,
                 lease: IdLease, groups: cgroups.VmCgroups,
                 devices: HostDevices | None = None) -> None:
        self.launcher = launcher
        self.vm_id = vm_id
        self.control = control
        self.lease = lease
        self.cgroups = groups
        self.devices = devices or HostDevices()
        self.pid = -1
        self.report: dict[str, Any] = {}
        self.stopped: dict[str, Any] | None = None
        self.start_ms = 0.0
        self.ready_ms = 0.0
        self.result: WorkerExit | None = None
        self._event_tokens = 2 * WORKER_EVENTS_PER_SECOND
        self._event_last = time.monotonic()
        self.events_dropped = 0

    @property
    def uid(self) -> int:
        return self.lease.uid

    def _control_msg(self, timeout: float) -> protocol.Message | None:
        """The next control message; security events are handled here, in passing (at
        most MAX_EVENTS_PER_CALL of them, so a flood cannot hold the caller)."""
        for _ in range(MAX_EVENTS_PER_CALL):
            ready, _, _ = select.select([self.control], [], [], timeout)
            if not ready:
                return None
            try:
                msg = protocol.recv(self.control)
            except (OSError, ProtocolError):
                msg = None
            if msg is None:
                return protocol.Message("eof")
            for fd in msg.fds:
                os.close(fd)
            if msg.op != protocol.OP_SECURITY_EVENT:
                return msg
            self._worker_event(msg)
            timeout = 0
        return None

    def _worker_event(self, msg: protocol.Message) -> None:
        """A device's security event from the worker: untrusted (a compromised worker
        chooses every byte), so bounded, rate-limited and named as the worker's."""
        now = time.monotonic()
        self._event_tokens = min(2 * WORKER_EVENTS_PER_SECOND, self._event_tokens
                                 + (now - self._event_last) * WORKER_EVENTS_PER_SECOND)
        self._event_last = now
        if self._event_tokens < 1:
            self.events_dropped += 1
            return
        self._event_tokens -= 1
        body = msg.body
        kind, source, detail = body.get("kind"), body.get("source"), body.get("detail")
        if not (isinstance(kind, str) and isinstance(source, str) and isinstance(detail, str)):
            kind, source, detail = "malformed-event", "", f"malformed event message {body!r}"
        if self.events_dropped:
            detail += f" ({self.events_dropped} earlier worker events dropped: rate limit)"
            self.events_dropped = 0
        self.launcher.security_events.report(
            kind[:64], f"worker {self.vm_id} (pid {self.pid}): {source[:256]}", detail[:2048])

    def _await_failure(self, detail: str) -> None:
        """The zygote could not start the VM process; the worker may have said why."""
        msg = self._control_msg(1.0)
        self._cleanup()
        if msg is not None and msg.op == protocol.OP_FAILED:
            raise _failure(msg)
        raise WorkerError(f"the worker did not start: {detail}")

    def _await_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                self.wait()
                raise WorkerError(f"worker {self.pid} was not ready within {timeout} s")
            msg = self._control_msg(min(left, 0.2))
            if msg is None:
                self.launcher._pump(0)
                if self.launcher.exit_status_of(self.pid) is not None:
                    raise WorkerError(f"worker {self.pid} died during setup: "
                                      f"{self._finish().describe()}")
                continue
            if msg.op == protocol.OP_READY:
                self.report = msg.body
                return
            if msg.op == protocol.OP_FAILED:
                self.wait()
                raise _failure(msg)
            if msg.op == "eof":
                raise WorkerError(f"worker {self.pid} closed its control socket during "
                                  f"setup: {self._finish().describe()}")

    def _finish(self) -> WorkerExit:
        result = self.wait()
        assert result is not None  # no timeout: wait returns once the process is reaped
        return result

    def stop(self, detail: str = "stop requested by the host") -> None:
        with contextlib.suppress(OSError):
            protocol.send(self.control, protocol.OP_STOP, {"detail": detail})

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.pid > 0 and self.result is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def ping(self, timeout: float = 5.0) -> dict[str, Any] | None:
        with contextlib.suppress(OSError):
            protocol.send(self.control, protocol.OP_PING)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._control_msg(max(0.0, deadline - time.monotonic()))
            if msg is None:
                continue  # a timeout ends the loop; security events passed in between
            if msg.op == "eof":
                return None
            if msg.op == protocol.OP_PONG:
                return msg.body
            if msg.op == protocol.OP_STOPPED:
                self.stopped = msg.body
        return None

    def wait(self, timeout: float | None = None) -> WorkerExit | None:
        """Until the worker process has exited; None on timeout."""
        if self.result is not None:
            return self.result
        deadline = None if timeout is None else time.monotonic() + timeout
        control_open = True
        while self.launcher.exit_status_of(self.pid) is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            step = 0.2 if left is None else min(left, 0.2)
            if control_open:
                msg = self._control_msg(0)
                if msg is not None and msg.op == protocol.OP_STOPPED:
                    self.stopped = msg.body
                elif msg is not None and msg.op == "eof":
                    control_open = False
            self.launcher._pump(step)
            if self.launcher._sock is None:
                break
        status = self.launcher.exit_status_of(self.pid)
        status = -1 if status is None else status
        while control_open:  # the "stopped" report may still be queued
            msg = self._control_msg(0)
            if msg is None or msg.op == "eof":
                break
            if msg.op == protocol.OP_STOPPED:
                self.stopped = msg.body
        seccomp = explain_sigsys(self.pid, status) if status >= 0 else None
        self.result = WorkerExit(self.pid, status, self.stopped, seccomp)
        if seccomp is not None:
            self.launcher.security_events.report(
                "seccomp-kill", f"worker {self.vm_id} (pid {self.pid}, uid {self.uid})",
                seccomp.describe())
        self._cleanup()
        return self.result

    @property
    def security_event(self) -> SecurityEvent | None:
        src = f"worker {self.vm_id} "
        for ev in self.launcher.security_events.events():
            if ev.source.startswith(src):
                return ev
        return None

    def _cleanup(self) -> None:
        self.control.close()
        self.devices.finish()  # the vsock broker stops, its socket path goes
        self.cgroups.remove()
        self.lease.release()


def _failure(msg: protocol.Message) -> JailError | BuildError:
    step = str(msg.body.get("step", "?"))
    detail = str(msg.body.get("detail", ""))
    return BuildError(detail) if step == "build" else JailError(step, detail)
