"""VM lifecycle: the state machine, the runner calls, exit detection, and reconciliation
after a daemon restart. Every transition is written to SQLite and then reported to the
lifecycle observers (the audit log hooks in here).

    stopped --start--> starting --spawned--> running <--pause/resume--> paused
    running|paused --stop--> stopping --exited--> stopped
    running|paused --the guest or VMM ends--> stopped
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from isovisor.host.disks import DiskStore
from isovisor.host.errors import HostError, InvalidState, RunnerError
from isovisor.host.images import ImageStore
from isovisor.host.models import ACTIVE_STATES, Disk, Vm, VmState, now
from isovisor.host.runner import Launch, VmHandle, VmMetrics, VmRunner
from isovisor.host.vms import VmStore

log = logging.getLogger(__name__)

STOP_TIMEOUT = 10.0  # seconds a VMM gets to stop cleanly before SIGKILL
WATCH_INTERVAL = 0.05  # exit detection latency


@dataclass(frozen=True)
class LifecycleEvent:
    """One VM state transition. `state` None means the VM was deleted; `previous` None
    that it was created."""

    tenant: str
    vm: str
    vm_id: str
    previous: VmState | None
    state: VmState | None
    reason: str
    actor: str  # the principal, or "isovisord" for transitions the daemon observed
    time: str


LifecycleObserver = Callable[[LifecycleEvent], None]
DAEMON = "isovisord"


class VmLifecycle:
    def __init__(self, vms: VmStore, images: ImageStore, runner: VmRunner) -> None:
        self.vms = vms
        self.images = images
        self.runner = runner
        # Encrypted disks and private copies (HostService sets it; issue #9)
        self.disks: DiskStore | None = None
        # `--net` values of a VM's NICs (HostService sets it to its NetworkService's)
        self.net_options: Callable[[str], tuple[str, ...]] = lambda _vm_id: ()
        self.observers: list[LifecycleObserver] = []
        # Called before every launch; raises (LaunchRefused) to refuse it. The daemon sets
        # it when integrity is configured (isovisor.host.integrity).
        self.launch_gate: Callable[[Vm], None] | None = None
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- helpers ------------------------------------------------------------------------

    def _lock(self, vm_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(vm_id, threading.Lock())

    def notify(self, vm: Vm, previous: VmState | None, state: VmState | None, reason: str,
               actor: str) -> None:
        event = LifecycleEvent(vm.tenant, vm.name, vm.id, previous, state, reason, actor, now())
        for observer in self.observers:
            try:
                observer(event)
            except Exception:  # an observer must not wedge the state machine
                log.exception("lifecycle observer failed for %s", event)

    def _move(self, vm: Vm, state: VmState, reason: str, actor: str, **fields: object) -> Vm:
        updated = self.vms.update(vm.id, state=state.value, **fields)
        self.notify(updated, vm.state, state, reason, actor)
        return updated

    def _handle(self, vm: Vm) -> VmHandle:
        if vm.handle is None:
            raise RunnerError(f"VM {vm.name!r} is {vm.state} but has no process handle")
        return VmHandle.from_json(vm.handle)

    def _launch(self, vm: Vm) -> Launch:
        disks: list[tuple[Path, bool]] = []
        keys: list[bytes | None] = []
        for i, d in enumerate(vm.disks):
            path, key = self._disk(vm, i, d)
            disks.append((path, d.readonly))
            keys.append(key)
        return Launch(vm_id=vm.id, kernel=self.images.path(vm.tenant, vm.kernel),
                      initrd=self.images.path(vm.tenant, vm.initrd) if vm.initrd else None,
                      cmdline=vm.cmdline, vcpus=vm.vcpus, memory_mib=vm.memory_mib,
                      disks=tuple(disks), disk_keys=tuple(keys), rng=vm.rng,
                      nets=self.net_options(vm.id))

    def _disk(self, vm: Vm, index: int, d: Disk) -> tuple[Path, bytes | None]:
        """A disk's image and key: a tenant disk (by name, this tenant's only), a shared
        read-only image (no key: the tenant's upload, which the guest cannot change), or
        the VM's private encrypted copy of a writable image."""
        if d.disk is not None:
            assert self.disks is not None
            return self.disks.open_for_vm(vm.tenant, d.disk)
        assert d.image is not None
        if d.readonly:
            return self.images.path(vm.tenant, d.image), None
        if self.disks is None:  # no key hierarchy: a plain private copy
            return self.images.vm_disk(vm.tenant, d.image, vm.id, index), None
        return self.disks.vm_copy(vm.tenant, vm.id, index, self.images.path(vm.tenant, d.image))

    # -- operations -----------------------------------------------------------------------

    def created(self, vm: Vm, actor: str) -> None:
        self.notify(vm, None, vm.state, "created", actor)

    def start(self, vm: Vm, actor: str) -> Vm:
        with self._lock(vm.id):
            vm = self.vms.get(vm.tenant, vm.name)
            if vm.state in (VmState.RUNNING, VmState.PAUSED, VmState.STARTING):
                return vm
            if vm.state is not VmState.STOPPED:
                raise InvalidState(f"VM {vm.name!r} is {vm.state}; it can be started when "
                                   "stopped")
            vm = self._move(vm, VmState.STARTING, "start requested", actor, desired="running")
            try:
                if self.launch_gate is not None:
                    self.launch_gate(vm)
                handle = self.runner.start(self._launch(vm))
            except HostError as exc:
                self._move(vm, VmState.STOPPED, f"start failed: {exc.message}", DAEMON,
                           last_stop_reason=f"start failed: {exc.message}")
                raise
            return self._move(vm, VmState.RUNNING, "VMM started", DAEMON,
                              handle=handle.to_json(), started_at=now(),
                              last_exit_status=None, last_stop_reason=None)

    def stop(self, vm: Vm, actor: str) -> Vm:
        with self._lock(vm.id):
            vm = self.vms.get(vm.tenant, vm.name)
            if vm.state is VmState.STOPPED:
                return vm
            vm = self._move(vm, VmState.STOPPING, "stop requested", actor, desired="stopped")
            return self._finish_stop(vm)

    def _finish_stop(self, vm: Vm) -> Vm:
        handle = self._handle(vm)
        self.runner.stop(handle, STOP_TIMEOUT)
        ended = self.runner.exit_info(handle)
        return self._move(vm, VmState.STOPPED, ended.reason, DAEMON,
                          last_exit_status=ended.status, last_stop_reason=ended.reason)

    def pause(self, vm: Vm, actor: str) -> Vm:
        with self._lock(vm.id):
            vm = self.vms.get(vm.tenant, vm.name)
            if vm.state is VmState.PAUSED:
                return vm
            if vm.state is not VmState.RUNNING:
                raise InvalidState(f"VM {vm.name!r} is {vm.state}; only a running VM pauses")
            self.runner.pause(self._handle(vm))
            return self._move(vm, VmState.PAUSED, "pause requested", actor)

    def resume(self, vm: Vm, actor: str) -> Vm:
        with self._lock(vm.id):
            vm = self.vms.get(vm.tenant, vm.name)
            if vm.state is VmState.RUNNING:
                return vm
            if vm.state is not VmState.PAUSED:
                raise InvalidState(f"VM {vm.name!r} is {vm.state}; only a paused VM resumes")
            self.runner.resume(self._handle(vm))
            return self._move(vm, VmState.RUNNING, "resume requested", actor)

    def delete(self, vm: Vm, actor: str) -> None:
        with self._lock(vm.id):
            vm = self.vms.get(vm.tenant, vm.name)
            if vm.state is not VmState.STOPPED:
                vm = self._move(vm, VmState.STOPPING, "delete requested", actor,
                                desired="stopped")
                vm = self._finish_stop(vm)
            handle = vm.handle
            self.vms.delete(vm.id)
            if handle is not None:
                shutil.rmtree(VmHandle.from_json(handle).run_dir, ignore_errors=True)
            self.images.delete_vm_disks(vm.id)
            if self.disks is not None:
                self.disks.delete_vm_copies(vm.tenant, vm.id)  # shredded (issue #9)
            self.notify(vm, vm.state, None, "deleted", actor)
        with self._locks_guard:
            self._locks.pop(vm.id, None)

    def send_console(self, vm: Vm, data: bytes) -> None:
        if vm.state not in (VmState.RUNNING, VmState.PAUSED):
            raise InvalidState(f"VM {vm.name!r} is {vm.state}; console input needs it running")
        self.runner.send_console(self._handle(vm), data)

    def console_path(self, vm: Vm) -> Path | None:
        return None if vm.handle is None else self.runner.console_path(self._handle(vm))

    def metrics(self, vm: Vm) -> VmMetrics:
        if vm.handle is None:
            return VmMetrics()
        return self.runner.metrics(self._handle(vm))

    # -- exits and restarts -----------------------------------------------------------------

    def poll_exits(self) -> None:
        """One pass: every VM whose process ended since the last pass becomes stopped."""
        for vm in self.vms.active():
            if vm.state not in (VmState.RUNNING, VmState.PAUSED) or vm.handle is None:
                continue
            if self.runner.alive(self._handle(vm)):
                continue
            lock = self._lock(vm.id)
            if not lock.acquire(blocking=False):
                continue  # an operation is under way; it will see the exit itself
            try:
                current = self.vms.by_id(vm.id)
                if current is None or current.state not in (VmState.RUNNING, VmState.PAUSED):
                    continue
                ended = self.runner.exit_info(self._handle(current))
                self._move(current, VmState.STOPPED, ended.reason, DAEMON, desired="stopped",
                           last_exit_status=ended.status, last_stop_reason=ended.reason)
            finally:
                lock.release()

    def reconcile(self) -> dict[str, str]:
        """After a restart: re-adopt every VM process that still runs; record how the
        others ended. Returns VM id -> what was done."""
        report: dict[str, str] = {}
        for vm in self.vms.active():
            if vm.handle is None:
                self._move(vm, VmState.STOPPED, "the daemon restarted before the VM started",
                           DAEMON, desired="stopped")
                report[vm.id] = "never started"
                continue
            handle = self._handle(vm)
            if self.runner.adopt(handle):
                if vm.state is VmState.STOPPING:
                    self._finish_stop(vm)
                    report[vm.id] = "adopted and stopped (a stop was under way)"
                elif vm.state is VmState.STARTING:
                    self._move(vm, VmState.RUNNING, "re-adopted after a daemon restart", DAEMON)
                    report[vm.id] = "adopted"
                else:
                    report[vm.id] = "adopted"
                continue
            ended = self.runner.exit_info(handle)
            reason = f"{ended.reason} (while the daemon was down)"
            self._move(vm, VmState.STOPPED, reason, DAEMON, desired="stopped",
                       last_exit_status=ended.status, last_stop_reason=reason)
            report[vm.id] = "ended while the daemon was down"
        return report

    def start_watcher(self) -> None:
        def watch() -> None:
            while not self._stop_watch.wait(WATCH_INTERVAL):
                try:
                    self.poll_exits()
                except Exception:
                    log.exception("VM exit watcher pass failed")

        self._stop_watch.clear()
        self._watcher = threading.Thread(target=watch, name="vm-exit-watcher", daemon=True)
        self._watcher.start()

    def stop_watcher(self) -> None:
        self._stop_watch.set()
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None


__all__ = ["ACTIVE_STATES", "DAEMON", "LifecycleEvent", "LifecycleObserver", "VmLifecycle"]
