"""The worker side: from the zygote's fork to a jailed, running VM.

Two processes: the zygote's child (W0) joins the VM's cgroups and unshares the new
namespaces, then forks the VM process (W1), reports W1's pid to the zygote and exits; W1
is pid 1 of the new PID namespace. W1 builds the VM from the fds it was handed (KVM
checks that a VM is used by the process that created it, so the VM must be made here),
then takes every other jail step in order, each failing closed with its name:

  mounts, pivot_root  private mount tree, per-VM tmpfs root, old root detached
  uts                 own hostname
  rlimits             nofile, nproc, core=0, fsize
  (core scheduling)   a cookie where the kernel has it; reported where it does not
  capabilities, credentials   bounding set dropped, own uid/gid, no capabilities
  no_new_privs
  landlock            no path reachable (a layer under seccomp)
  imports             interpreter sealed: no file is read after this
  seccomp             base filter for the process; each thread adds its role's filter

Only then does a vCPU run guest code.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from isovisor.kvm import Kvm, KvmError
from isovisor.memory import GuestMemoryError
from isovisor.vmm.boot.errors import BootError
from isovisor.vmm.builder import Machine, SerialSpec, VmSpec
from isovisor.vmm.emulator_probe import EmulatorProbe
from isovisor.vmm.stop import StopEvent, StopReason
from isovisor.vmm.vm import VmError
from isovisor.worker import (
    capabilities,
    cgroups,
    core_sched,
    devices,
    landlock,
    mounts,
    namespaces,
    preload,
    protocol,
    rlimits,
    test_hook,
)
from isovisor.worker.config import (
    FD_CONTROL,
    FD_FIRST_FREE,
    FD_INITRD,
    FD_KERNEL,
    FD_KVM,
    FD_TARGET,
    WorkerConfig,
)
from isovisor.worker.errors import BuildError, JailError, ProtocolError
from isovisor.worker.event_forward import EventForwarder
from isovisor.worker.seccomp import threads
from isovisor.worker.seccomp.install import install

log = logging.getLogger(__name__)

EXIT_JAIL_FAILED = 100
EXIT_BUILD_FAILED = 101
EXIT_INTERNAL = 102
FD_REPORT = FD_FIRST_FREE  # W0 -> zygote: the VM process's pid
CONTROL_POLL_MS = 1000
MAX_FD = 4096


@dataclass(frozen=True)
class HostFacts:
    """What the zygote learned once and the jailed worker can no longer read."""

    programs: dict[str, bytes]
    cap_last: int
    smt: str
    probe: EmulatorProbe | None = None  # the emulator probe's result (None: no KVM yet)


# --- W0: the zygote's child ------------------------------------------------------------


def _remap_fds(fds: list[int], cfg: WorkerConfig, report_w: int) -> None:
    high = {slot: fcntl.fcntl(fds[i], fcntl.F_DUPFD_CLOEXEC, 64)
            for slot, i in cfg.fd_index.items()}
    report_high = fcntl.fcntl(report_w, fcntl.F_DUPFD_CLOEXEC, 64)
    for fd in {*fds, report_w}:
        os.close(fd)
    for slot, fd in high.items():
        os.dup2(fd, FD_TARGET[slot], inheritable=False)
        os.close(fd)
    os.dup2(report_high, FD_REPORT, inheritable=False)
    os.close(report_high)
    for target in (0, 1, 2):
        if target not in (FD_TARGET[s] for s in high):
            null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            os.dup2(null, target, inheritable=False)
            os.close(null)
    start = FD_REPORT + 1  # close everything else, keeping the device backends
    for keep in devices.device_fd_targets(cfg):
        os.closerange(start, keep)
        start = keep + 1
    os.closerange(start, MAX_FD)


def worker_entry(cfg: WorkerConfig, fds: list[int], report_w: int, facts: HostFacts,
                 detach: list[socket.socket]) -> NoReturn:
    """Runs in the zygote's fresh child; never returns."""
    try:
        for s in detach:  # the zygote's sockets: their numbers are about to be reused
            s.detach()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        _remap_fds(fds, cfg, report_w)
        control = socket.socket(fileno=FD_CONTROL)
    except BaseException:
        os._exit(EXIT_INTERNAL)
    try:
        cgroups.join(cfg.cgroup_procs)
        namespaces.enter_new_namespaces()
        pid = os.fork()
    except JailError as exc:
        _send_failure(control, exc.step, exc.detail)
        os._exit(EXIT_JAIL_FAILED)
    except OSError as exc:
        _send_failure(control, "namespaces", f"fork into the PID namespace: {exc.strerror}")
        os._exit(EXIT_JAIL_FAILED)
    if pid:
        os.write(FD_REPORT, f"{pid}\n".encode())
        os._exit(0)
    os.close(FD_REPORT)
    status = EXIT_INTERNAL
    try:
        status = worker_init(cfg, control, facts)
    finally:
        sys.stdout.flush() if sys.stdout else None
        os._exit(status)


def _send_failure(control: socket.socket, step: str, detail: str) -> None:
    try:
        protocol.send(control, protocol.OP_FAILED, {"step": step, "detail": detail})
    except OSError:
        pass


# --- W1: the VM process, init of its PID namespace --------------------------------------


def _fd_path(slot: str) -> Path:
    return Path(f"/proc/self/fd/{FD_TARGET[slot]}")


def build_machine(cfg: WorkerConfig, probe: EmulatorProbe | None = None) -> Machine:
    """The VM, from the fds the host side passed: the kernel and initrd through
    /proc/self/fd, the device backends as they are (devices.worker_devices)."""
    has = cfg.fd_index
    try:
        disks, nets, vsock, backends = devices.worker_devices(cfg)
    except ProtocolError as exc:  # checked in the zygote already: cannot happen
        raise BuildError(str(exc)) from None
    serial = SerialSpec(target="stdio" if "serial_out" in has else "none",
                        rate=cfg.serial_rate, total_limit=cfg.serial_total_limit)
    spec = VmSpec(
        kernel=_fd_path("kernel"), initrd=_fd_path("initrd") if "initrd" in has else None,
        cmdline=cfg.cmdline, memory=cfg.memory, vcpus=cfg.vcpus,
        protocol=cfg.protocol,  # type: ignore[arg-type]
        serial=serial, serial_input="fd:0" if "serial_in" in has else "none",
        rng=bool(cfg.rng), disks=disks, nets=nets, vsock=vsock,
    )
    try:
        kvm = Kvm(str(_fd_path("kvm")))
        machine = Machine(spec, kvm, probe=probe, backends=backends)
    except (KvmError, VmError, BootError, GuestMemoryError) as exc:
        raise BuildError(str(exc)) from None
    # Setup is over: no fd that could create another VM or reread an image stays open.
    kvm.close()
    for fd in (FD_KVM, FD_KERNEL, FD_INITRD):
        try:
            os.close(fd)
        except OSError:
            pass
    return machine


def _jail(cfg: WorkerConfig, facts: HostFacts, report: dict[str, Any]) -> None:
    """Every step after the build, up to (not including) seccomp."""
    limits = rlimits.plan(cfg.vcpus, cfg.tasks_limit, [1, 2], cfg.serial_total_limit or 0,
                          disk_sizes=devices.disk_sizes(cfg),
                          extra_fds=rlimits.VSOCK_FDS if cfg.vsock is not None else 0)
    mounts.build_root(cfg.binds)
    namespaces.set_hostname()
    rlimits.apply(limits)
    report["rlimits"] = limits.as_dict()
    report["core_scheduling"] = core_sched.create_cookie(facts.smt).detail
    capabilities.drop_privileges(cfg.uid, cfg.gid, facts.cap_last)
    capabilities.set_no_new_privs()
    report["landlock"] = landlock.restrict_self().detail
    report["uid"], report["gid"] = cfg.uid, cfg.gid


def worker_init(cfg: WorkerConfig, control: socket.socket, facts: HostFacts) -> int:
    logging.getLogger().setLevel(cfg.log_level)
    report: dict[str, Any] = {"vm_id": cfg.vm_id}
    machine: Machine | None = None
    try:
        machine = build_machine(cfg, facts.probe)
        _jail(cfg, facts, report)
        if cfg.test_hook == "probe":
            report["probe"] = test_hook.probe()
        try:
            preload.seal()
        except Exception as exc:
            raise JailError("imports", str(exc)) from None
        install(facts.programs["base"], all_threads=True, step="seccomp")
        threads.install_role_hook(facts.programs)
        machine.start()
        install(facts.programs["control"], step="seccomp (control thread)")
    except (JailError, BuildError) as exc:
        _send_failure(control, exc.step, exc.detail)
        if machine is not None:
            machine.close()
        return EXIT_BUILD_FAILED if isinstance(exc, BuildError) else EXIT_JAIL_FAILED
    protocol.send(control, protocol.OP_READY, report)
    if cfg.test_hook and cfg.test_hook != "probe":
        outcome = test_hook.run_forbidden(cfg.test_hook)  # seccomp ends us here
        machine.vm.request_stop(StopEvent(StopReason.VMM_ERROR, None,
                                          f"test hook {cfg.test_hook} was not stopped: "
                                          f"{outcome}"))
    return control_loop(machine, control)


def control_loop(machine: Machine, control: socket.socket) -> int:
    vm = machine.vm
    forwarder = EventForwarder()  # device security events -> the host, each turn below
    vm.security_events.listeners.append(forwarder)
    for ev in vm.security_events.events():  # raised before the loop started
        forwarder(ev)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    def wake(_ev: StopEvent) -> None:
        os.write(wake_w, b".")

    vm.stop_listeners.append(wake)

    def on_signal(signum: int, _frame: object) -> None:
        vm.stop(f"stopped by {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    poller = select.poll()
    poller.register(control, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    suspects: set[str] = set()
    while vm.stop_event is None:
        for fd, _ in poller.poll(CONTROL_POLL_MS):
            if fd == wake_r:
                continue
            _handle_control(machine, control)
        forwarder.flush(control)
        # A thread seen twice (a second apart) without its role filter bypassed the hook.
        now = set(threads.unfiltered_threads())
        if now & suspects:
            vm.request_stop(StopEvent(StopReason.VMM_ERROR, None, "thread without a role "
                                      f"filter: {', '.join(sorted(now & suspects))}"))
        suspects = now
    event = machine.wait()
    assert event is not None
    machine.close()
    forwarder.flush(control)
    if sys.stdout:
        sys.stdout.flush()
    body = {"reason": event.reason.name, "vcpu": event.vcpu, "detail": event.detail,
            "exit_status": event.reason.exit_status, "describe": event.describe(),
            "security_events": [f"{e.kind} from {e.source}: {e.detail}"
                                for e in vm.security_events.events()]}
    try:
        protocol.send(control, protocol.OP_STOPPED, body)
    except OSError:
        pass
    return event.reason.exit_status


def _handle_control(machine: Machine, control: socket.socket) -> None:
    vm = machine.vm
    try:
        msg = protocol.recv(control)
    except (OSError, ProtocolError) as exc:
        vm.stop(f"control socket failed: {exc}")
        return
    if msg is None:
        vm.stop("the host closed the control socket")
        return
    for fd in msg.fds:  # the worker accepts no fds at run time
        os.close(fd)
    if msg.op == protocol.OP_STOP:
        detail = msg.body.get("detail")
        vm.stop(detail if isinstance(detail, str) else "stop requested by the host")
    elif msg.op == protocol.OP_PING:
        protocol.send(control, protocol.OP_PONG, {
            "threads": sorted(t.name for t in threading.enumerate()),
            "vcpus": [v.state.value for v in vm.vcpus],
        })
    else:
        log.warning("control: unknown op %r ignored", msg.op)
