"""A vCPU thread: an explicit run-state machine around KVM_RUN and exit dispatch.

Pause, resume and stop come from other threads without races: the requester records the
request, sets kvm_run.immediate_exit and signals the vCPU thread, so KVM_RUN returns at once
whether the thread is inside it or about to enter it.
"""

from __future__ import annotations

import enum
import errno
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from isovisor.devices.bus import Bus
from isovisor.kvm import VcpuFd
from isovisor.kvm import constants as c
from isovisor.kvm.errors import KvmIoctlError
from isovisor.vmm.stop import StopEvent, StopReason

log = logging.getLogger(__name__)

# The signal that kicks a vCPU thread out of KVM_RUN. Its handler must exist (a no-op) in
# the process, or the signal would kill it; Vm installs it.
KICK_SIGNAL = signal.SIGRTMIN + 1
# Emulation failures in a row at which an assisted instruction stops counting as progress.
MAX_CONSECUTIVE_ASSISTS = 10_000


class VcpuState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass
class VcpuStats:
    exits: dict[str, int] = field(default_factory=dict)
    assists: dict[str, int] = field(default_factory=dict)

    def count(self, reason: str) -> None:
        self.exits[reason] = self.exits.get(reason, 0) + 1


AssistFn = Callable[[VcpuFd], str | None]
StopFn = Callable[[StopEvent], None]


def install_kick_handler() -> None:
    """Install the no-op handler for KICK_SIGNAL (must run on the main thread)."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK_SIGNAL, lambda _signum, _frame: None)


class Vcpu:
    def __init__(
        self,
        index: int,
        fd: VcpuFd,
        pio: Bus,
        mmio: Bus,
        on_stop: StopFn,
        assist: AssistFn | None = None,
    ) -> None:
        self.index = index
        self.fd = fd
        self.pio = pio
        self.mmio = mmio
        self._on_stop = on_stop
        self._assist = assist
        self.stats = VcpuStats()
        self._cond = threading.Condition()
        self._state = VcpuState.CREATED
        self._want: VcpuState = VcpuState.RUNNING
        self._thread: threading.Thread | None = None

    # --- control (any thread) ---------------------------------------------------------

    @property
    def state(self) -> VcpuState:
        with self._cond:
            return self._state

    def start(self) -> None:
        with self._cond:
            if self._state is not VcpuState.CREATED:
                raise RuntimeError(f"vCPU {self.index} already started")
            self._thread = threading.Thread(
                target=self._run, name=f"vcpu{self.index}", daemon=True
            )
            self._state = VcpuState.RUNNING
        self._thread.start()

    def _request(self, want: VcpuState) -> None:
        with self._cond:
            if self._state is VcpuState.STOPPED:
                return
            self._want = want
            self._cond.notify_all()
        if want is not VcpuState.RUNNING:
            self._kick()

    def _kick(self) -> None:
        run = self.fd.run
        if run is not None:
            run.immediate_exit = 1
        t = self._thread
        if t is not None and t.ident is not None and t.is_alive():
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def pause(self, timeout: float = 5.0) -> bool:
        """Pause and wait until the vCPU is out of the guest. False if it did not in time."""
        self._request(VcpuState.PAUSED)
        with self._cond:
            return self._cond.wait_for(
                lambda: self._state in (VcpuState.PAUSED, VcpuState.STOPPED), timeout
            )

    def resume(self) -> None:
        self._request(VcpuState.RUNNING)

    def stop(self) -> None:
        self._request(VcpuState.STOPPED)

    def join(self, timeout: float | None = None) -> None:
        t = self._thread
        if t is not None:
            t.join(timeout)

    # --- the vCPU thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a VMM bug: contain it, stop the VM, report
            log.exception("vCPU %d: VMM fault", self.index)
            detail = f"{type(exc).__name__}: {exc}"
            self._on_stop(StopEvent(StopReason.VMM_ERROR, self.index, detail))
        finally:
            with self._cond:
                self._state = VcpuState.STOPPED
                self._cond.notify_all()

    def _honour_requests(self) -> bool:
        """Apply pending pause/stop requests. Returns False when the thread must end."""
        with self._cond:
            # Cleared under the lock, before reading the request: a request made after this
            # point sets it again and KVM_RUN returns at once.
            run = self.fd.run
            if run is not None:
                run.immediate_exit = 0
            while True:
                if self._want is VcpuState.STOPPED:
                    return False
                if self._want is VcpuState.PAUSED:
                    self._state = VcpuState.PAUSED
                    self._cond.notify_all()
                    self._cond.wait()
                    continue
                self._state = VcpuState.RUNNING
                return True

    def _loop(self) -> None:
        run = self.fd.kvm_run
        assists_in_a_row = 0
        while self._honour_requests():
            try:
                if self.fd.run_once() < 0:
                    continue  # kicked (EINTR): go and look at the requests
            except KvmIoctlError as exc:
                if exc.errno == errno.EAGAIN:
                    continue
                raise
            reason = run.exit_reason
            if reason == c.ExitReason.IO:
                self._io(run)
            elif reason == c.ExitReason.MMIO:
                self._mmio(run)
            elif reason == c.ExitReason.INTR:
                continue
            elif reason == c.ExitReason.INTERNAL_ERROR:
                name = self._try_assist(run)
                if name is not None and assists_in_a_row < MAX_CONSECUTIVE_ASSISTS:
                    assists_in_a_row += 1
                    continue
                self._stop(StopReason.EMULATION_ERROR, self._describe_internal(run))
                return
            else:
                if self._other_exit(run, reason):
                    return
                continue
            assists_in_a_row = 0

    def _stop(self, reason: StopReason, detail: str) -> None:
        self._on_stop(StopEvent(reason, self.index, detail))

    def _io(self, run: object) -> None:
        io = self.fd.kvm_run.exit.io
        size, count, port = io.size, io.count, io.port
        if size not in (1, 2, 4) or count == 0:
            self.stats.count("io-malformed")
            return
        data = self.fd.io_data(io.data_offset, size * count)
        if io.direction == c.KVM_EXIT_IO_OUT:
            self.stats.count("io-out")
            for i in range(count):
                self.pio.write(port, bytes(data[i * size : (i + 1) * size]))
        else:
            self.stats.count("io-in")
            for i in range(count):
                data[i * size : (i + 1) * size] = self.pio.read(port, size)
        data.release()

    def _mmio(self, run: object) -> None:
        mmio = self.fd.kvm_run.exit.mmio
        length = mmio.len
        if length not in (1, 2, 4, 8):
            self.stats.count("mmio-malformed")
            return
        if mmio.is_write:
            self.stats.count("mmio-write")
            self.mmio.write(mmio.phys_addr, bytes(mmio.data[:length]))
        else:
            self.stats.count("mmio-read")
            value = self.mmio.read(mmio.phys_addr, length)
            for i in range(length):
                mmio.data[i] = value[i]

    def _try_assist(self, run: object) -> str | None:
        internal = self.fd.kvm_run.exit.internal
        if internal.suberror != c.InternalSuberror.EMULATION or self._assist is None:
            return None
        name = self._assist(self.fd)
        if name is not None:
            self.stats.assists[name] = self.stats.assists.get(name, 0) + 1
        return name

    def _describe_internal(self, run: object) -> str:
        r = self.fd.kvm_run
        internal = r.exit.internal
        try:
            sub = c.InternalSuberror(internal.suberror).name.lower()
        except ValueError:
            sub = f"suberror {internal.suberror}"
        try:
            regs = self.fd.get_regs()
            sregs = self.fd.get_sregs()
            where = f"RIP={regs.rip:#x} CS.base={sregs.cs.base:#x}"
        except KvmIoctlError:
            where = "RIP unavailable"
        insn = ""
        ef = r.exit.emulation_failure
        if internal.suberror == c.InternalSuberror.EMULATION and (
            ef.flags & c.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
        ):
            n = min(int(ef.insn_size), 15)
            insn = " instruction bytes: " + bytes(ef.insn_bytes[:n]).hex(" ")
        return f"KVM internal error ({sub}) at {where}{insn}"

    def _other_exit(self, run: object, reason: int) -> bool:
        """Handle the rarer exits. Returns True when this vCPU must stop."""
        r = self.fd.kvm_run
        try:
            name = c.ExitReason(reason).name
        except ValueError:
            name = f"exit {reason}"
        self.stats.count(name.lower())
        if reason == c.ExitReason.SHUTDOWN:
            self._stop(StopReason.TRIPLE_FAULT, "triple fault (KVM_EXIT_SHUTDOWN)")
            return True
        if reason == c.ExitReason.SYSTEM_EVENT:
            ev = r.exit.system_event.type
            if ev == c.SystemEvent.RESET:
                self._stop(StopReason.GUEST_RESET, "KVM system event: reset")
            elif ev == c.SystemEvent.SHUTDOWN:
                self._stop(StopReason.GUEST_SHUTDOWN, "KVM system event: shutdown")
            else:
                self._stop(StopReason.GUEST_CRASH, f"KVM system event {ev}")
            return True
        if reason == c.ExitReason.HLT:
            return False  # only without an in-kernel irqchip; the loop re-enters
        if reason == c.ExitReason.FAIL_ENTRY:
            code = r.exit.fail_entry.hardware_entry_failure_reason
            self._stop(StopReason.EMULATION_ERROR, f"VM entry failed (hardware reason {code:#x})")
            return True
        self._stop(StopReason.EMULATION_ERROR, f"unhandled KVM exit {name}")
        return True
