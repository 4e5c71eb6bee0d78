"""A vCPU thread: an explicit run-state machine around KVM_RUN and exit dispatch.

Pause, resume and stop come from other threads without races: the requester records the
request, sets kvm_run.immediate_exit and signals the vCPU thread, so KVM_RUN returns at once
whether the thread is inside it or about to enter it.
"""

from __future__ import annotations

import ctypes
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
    io_in: int = 0
    io_out: int = 0
    mmio_read: int = 0
    mmio_write: int = 0
    malformed: int = 0
    other: dict[str, int] = field(default_factory=dict)  # the rare exits, by name
    assists: dict[str, int] = field(default_factory=dict)

    def count(self, reason: str) -> None:
        self.other[reason] = self.other.get(reason, 0) + 1


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
        # Set (after _want) by requesters, read without the lock by the vCPU loop: the
        # common case, no request, costs one attribute read per exit.
        self._pending = False
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
            self._pending = True
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
            self.fd.kvm_run.immediate_exit = 0
            self._pending = False
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
        """The hot loop: everything it touches per exit is bound to a local first."""
        run = self.fd.kvm_run
        io, mmio = run.exit.io, run.exit.mmio
        page = self.fd.run_page
        run_kvm = self.fd.fast_runner()
        pio_read, pio_write = self.pio.read, self.pio.write
        mmio_read, mmio_write = self.mmio.read, self.mmio.write
        mmio_data_addr = ctypes.addressof(mmio.data)
        memmove = ctypes.memmove
        stats = self.stats
        exit_io, exit_mmio = int(c.ExitReason.IO), int(c.ExitReason.MMIO)
        exit_intr, exit_internal = int(c.ExitReason.INTR), int(c.ExitReason.INTERNAL_ERROR)
        io_out = c.KVM_EXIT_IO_OUT
        retry = (errno.EINTR, errno.EAGAIN)
        assists_in_a_row = 0
        if not self._honour_requests():
            return
        while True:
            if self._pending and not self._honour_requests():
                return
            err = run_kvm()
            if err:
                if err in retry:
                    # kicked, or a stale immediate_exit: clear it, then look at requests
                    # (requesters set _pending before immediate_exit)
                    run.immediate_exit = 0
                    continue
                raise KvmIoctlError("KVM_RUN", err)
            reason = run.exit_reason
            if reason == exit_io:
                size, count, port, off = io.size, io.count, io.port, io.data_offset
                if count == 1 and size in (1, 2, 4):
                    if io.direction == io_out:
                        stats.io_out += 1
                        pio_write(port, page[off : off + size])
                    else:
                        stats.io_in += 1
                        page[off : off + size] = pio_read(port, size)
                else:
                    self._string_io(size, count, port, off, io.direction == io_out)
            elif reason == exit_mmio:
                length = mmio.len
                if length not in (1, 2, 4, 8):
                    stats.malformed += 1
                elif mmio.is_write:
                    stats.mmio_write += 1
                    mmio_write(mmio.phys_addr, bytes(mmio.data)[:length])
                else:
                    stats.mmio_read += 1
                    memmove(mmio_data_addr, mmio_read(mmio.phys_addr, length), length)
            elif reason == exit_intr:
                continue
            elif reason == exit_internal:
                name = self._try_assist()
                if name is not None and assists_in_a_row < MAX_CONSECUTIVE_ASSISTS:
                    assists_in_a_row += 1
                    continue
                self._stop(StopReason.EMULATION_ERROR, self._describe_internal())
                return
            else:
                if self._other_exit(reason):
                    return
                continue
            assists_in_a_row = 0

    def _string_io(self, size: int, count: int, port: int, offset: int, out: bool) -> None:
        """rep ins/outs: `count` items of `size` bytes in the kvm_run data area."""
        if size not in (1, 2, 4) or count == 0:
            self.stats.malformed += 1
            return
        data = self.fd.io_data(offset, size * count)  # bounds-checked against the page
        try:
            for i in range(count):
                item = slice(i * size, (i + 1) * size)
                if out:
                    self.stats.io_out += 1
                    self.pio.write(port, bytes(data[item]))
                else:
                    self.stats.io_in += 1
                    data[item] = self.pio.read(port, size)
        finally:
            data.release()

    def _stop(self, reason: StopReason, detail: str) -> None:
        self._on_stop(StopEvent(reason, self.index, detail))

    def _try_assist(self) -> str | None:
        internal = self.fd.kvm_run.exit.internal
        if internal.suberror != c.InternalSuberror.EMULATION or self._assist is None:
            return None
        name = self._assist(self.fd)
        if name is not None:
            self.stats.assists[name] = self.stats.assists.get(name, 0) + 1
        return name

    def _describe_internal(self) -> str:
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

    def _other_exit(self, reason: int) -> bool:
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
