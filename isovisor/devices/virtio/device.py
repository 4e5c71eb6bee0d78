"""The VirtioDevice base: what every virtio device shares, whatever its transport.

A device has a type, feature bits, a configuration space and a fixed set of queues. Once
the driver sets DRIVER_OK the transport calls `activate`, and the device runs an I/O thread
of its own: epoll over the queues' notify eventfds (ioeventfds: a guest's QueueNotify write
never leaves the kernel), a stop eventfd, a wake eventfd and any backend fds the device
watches, with the epoll timeout taken from `next_wakeup()` (rate limiters).

Containment. Everything a handler does runs inside a guard: a GuestProtocolError (a broken
or hostile driver) puts the device into DEVICE_NEEDS_RESET, reports a security event and
ends the I/O thread; any other exception is a device fault and does the same. Nothing
escapes into the vCPU thread or any other device; the device waits for the driver's reset.

Subclassing contract (see rng.py for a complete example):

    class MyDevice(VirtioDevice):
        device_type = constants.DEVICE_ID_...      # §5
        queue_max_sizes = (256, 256)               # one entry per queue, powers of two
        name = "virtio-my"                         # for logs and security events

        def device_features(self) -> int           # device-specific bits (0-23, 41+)
        def config_space(self) -> bytes            # the current config layout (§5.x.4)
        def config_write(self, offset, data)       # a bounds-checked driver write
        def features_ok(self, features) -> bool    # veto a negotiated combination
        def process_queue(self, index, queue) -> bool   # REQUIRED, see below
        def on_activate(self) / on_reset(self)     # set up / drop per-activation state
        def next_wakeup(self) -> float | None      # seconds until on_timer is due
        def on_timer(self)                         # default: process every queue

`process_queue(index, queue)` runs in the I/O thread: pop chains (`queue.pop()`), check
them (`chain.descriptors()`, `readable_bytes`, ...), do the work, `queue.add_used(head,
written)`. Return True when the queue is empty, False when the device stopped early (rate
limited, backend full) and will come back by `next_wakeup`/`on_timer` or a watched fd.
Raise GuestProtocolError for a hostile driver; complete a BadRequest with whatever status
the device type defines. The base sends used-buffer interrupts (EVENT_IDX aware) after
each call, and re-arms notifications. Backends: `watch_fd(fd, handler)` in on_activate.
"""

from __future__ import annotations

import enum
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

from isovisor.devices.events import SecurityEventSink
from isovisor.devices.virtio.chain import GuestProtocolError
from isovisor.devices.virtio.constants import TRANSPORT_FEATURES
from isovisor.devices.virtio.queue import Virtqueue
from isovisor.memory import GuestMemory

log = logging.getLogger(__name__)

# How long reset() waits for the I/O thread to finish the request it is on. A handler is
# bounded work (one chain at a time); past this the thread is abandoned but flagged to stop.
JOIN_TIMEOUT = 5.0
SECURITY_EVENT_KIND = "virtio-needs-reset"
# The shortest epoll timeout for a timer: a device whose timer is already due still waits
# this long, so a device that cannot make progress never spins the I/O thread.
MIN_TIMER_WAIT = 0.001


class VirtioInterrupt(Protocol):
    """How a device reaches its driver; the transport implements it (thread-safe)."""

    def signal_used_buffer(self) -> None: ...

    def signal_config_change(self) -> None: ...

    def set_needs_reset(self) -> None: ...


class DeviceState(enum.Enum):
    INACTIVE = "inactive"  # before DRIVER_OK, or after reset
    ACTIVE = "active"  # the I/O thread serves the queues
    BROKEN = "broken"  # NEEDS_RESET: stopped until the driver resets the device


@dataclass
class DeviceStats:
    activations: int = 0
    notifications: int = 0  # queue notifies handled
    interrupts: int = 0  # used-buffer interrupts sent
    needs_reset: int = 0


class VirtioDevice:
    """Base of every virtio device model (see the module docstring for the contract)."""

    device_type: ClassVar[int] = 0
    queue_max_sizes: ClassVar[tuple[int, ...]] = ()
    name: ClassVar[str] = "virtio"

    def __init__(self, events: SecurityEventSink) -> None:
        self.events = events
        self.source = self.name  # the transport adds its address
        self.acked_features = 0
        self.stats = DeviceStats()
        self.mem: GuestMemory | None = None
        self.queues: tuple[Virtqueue | None, ...] = ()
        self._interrupt: VirtioInterrupt | None = None
        self._state = DeviceState.INACTIVE
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop_fd = -1
        self._wake_fd = -1
        self._notify_fds: tuple[int, ...] = ()
        self._watched: dict[int, Callable[[], None]] = {}
        self._stopping = threading.Event()

    # --- what subclasses override ------------------------------------------------------

    def device_features(self) -> int:
        return 0

    def config_space(self) -> bytes:
        return b""

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write inside the config space; read-only by default (ignored)."""

    def features_ok(self, features: int) -> bool:
        return True

    def process_queue(self, index: int, queue: Virtqueue) -> bool:
        raise NotImplementedError

    def on_activate(self) -> None:
        pass

    def on_reset(self) -> None:
        pass

    def next_wakeup(self) -> float | None:
        return None

    def on_timer(self) -> None:
        for i in range(len(self.queues)):
            self._process(i)

    # --- helpers for subclasses -------------------------------------------------------

    @property
    def state(self) -> DeviceState:
        return self._state

    @property
    def stopping(self) -> bool:
        """True once reset asked the I/O thread to finish: stop between requests."""
        return self._stopping.is_set()

    def negotiated(self, feature: int) -> bool:
        return bool(self.acked_features & feature)

    def wake(self) -> None:
        """Make the I/O thread re-run every queue and recompute its timeout (after a rate
        limiter update, for example). Safe from any thread; a no-op when inactive."""
        with self._state_lock:  # reset closes the fd under this lock: no stale fd numbers
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)

    def config_changed(self) -> None:
        """The device changed its config space: bump ConfigGeneration, interrupt (§2.5)."""
        if self._interrupt is not None:
            self._interrupt.signal_config_change()

    def watch_fd(self, fd: int, handler: Callable[[], None]) -> None:
        """Call `handler` in the I/O thread whenever `fd` is readable (from on_activate)."""
        self._watched[fd] = handler

    # --- transport side --------------------------------------------------------------

    @property
    def avail_features(self) -> int:
        return TRANSPORT_FEATURES | self.device_features()

    def read_config(self, offset: int, size: int) -> bytes:
        """Bounds-checked config read: outside the config space reads as zeros."""
        data = self.config_space()
        if offset < 0 or size <= 0 or offset + size > len(data):
            return bytes(max(size, 0))
        return data[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """Bounds-checked config write: outside the config space is ignored."""
        if offset < 0 or not data or offset + len(data) > len(self.config_space()):
            return
        self.config_write(offset, bytes(data))

    def activate(
        self,
        mem: GuestMemory,
        queues: Sequence[Virtqueue | None],
        interrupt: VirtioInterrupt,
        notify_fds: Sequence[int],
    ) -> None:
        """Start serving: `queues[i]` is None for a queue the driver did not set up;
        `notify_fds[i]` is the eventfd signalled when the driver notifies queue i."""
        if len(queues) != len(self.queue_max_sizes) or len(notify_fds) != len(queues):
            raise ValueError(f"{self.name}: expected {len(self.queue_max_sizes)} queues")
        with self._state_lock:
            if self._state is not DeviceState.INACTIVE:
                raise RuntimeError(f"{self.source}: activate while {self._state.value}")
            self._state = DeviceState.ACTIVE
        self.mem = mem
        self.queues = tuple(queues)
        self._interrupt = interrupt
        self._notify_fds = tuple(notify_fds)
        self._watched = {}
        self._stopping.clear()
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.stats.activations += 1
        if not self._guard(self.on_activate):
            return
        self._thread = threading.Thread(
            target=self._run, name=f"io-{self.source}", daemon=True
        )
        self._thread.start()

    def reset(self) -> None:
        """Stop the I/O thread and return to the zero state (the transport's reset)."""
        self._stopping.set()
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)
        t = self._thread
        stuck = False
        if t is not None and t is not threading.current_thread():
            t.join(JOIN_TIMEOUT)
            stuck = t.is_alive()
            if stuck:
                log.error("%s: I/O thread did not stop within %.0fs", self.source, JOIN_TIMEOUT)
        self._thread = None
        try:
            self.on_reset()
        except Exception:
            log.exception("%s: on_reset failed", self.source)
        with self._state_lock:
            # A stuck thread keeps its (signalled) stop fd: closing it could hand the
            # number to an unrelated file while the thread still polls it.
            for fd in (self._wake_fd,) if stuck else (self._stop_fd, self._wake_fd):
                if fd >= 0:
                    os.close(fd)
            self._stop_fd = self._wake_fd = -1
        self._watched = {}
        self.mem = None
        self.queues = ()
        self._notify_fds = ()
        self._interrupt = None
        self.acked_features = 0
        with self._state_lock:
            self._state = DeviceState.INACTIVE

    # --- the I/O thread ---------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        with self._state_lock:
            if self._state is not DeviceState.ACTIVE:
                return
            self._state = DeviceState.BROKEN
        self.stats.needs_reset += 1
        self.events.report(SECURITY_EVENT_KIND, self.source, reason)
        if self._interrupt is not None:
            self._interrupt.set_needs_reset()

    def _guard(self, fn: Callable[[], object]) -> bool:
        """Run `fn`; on any error put the device into NEEDS_RESET. True if it is still
        active afterwards."""
        try:
            fn()
        except GuestProtocolError as exc:
            self._fail(f"guest protocol error: {exc}")
        except Exception as exc:
            log.exception("%s: device fault", self.source)
            self._fail(f"device fault: {type(exc).__name__}: {exc}")
        return self._state is DeviceState.ACTIVE

    def _process(self, index: int) -> None:
        q = self.queues[index] if index < len(self.queues) else None
        if q is None or self._state is not DeviceState.ACTIVE:
            return
        while not self.stopping:
            before = q.next_used
            drained = self.process_queue(index, q)
            if q.next_used != before and q.needs_notification() and self._interrupt:
                self.stats.interrupts += 1
                self._interrupt.signal_used_buffer()
            if not drained or not q.enable_notification():
                return

    def _run(self) -> None:
        ep = select.epoll()
        try:
            ep.register(self._stop_fd, select.EPOLLIN)
            ep.register(self._wake_fd, select.EPOLLIN)
            by_fd: dict[int, Callable[[], None]] = {}
            for i, fd in enumerate(self._notify_fds):
                if self.queues[i] is not None:
                    by_fd[fd] = _queue_handler(self, i)
            by_fd.update(self._watched)
            for fd in by_fd:
                ep.register(fd, select.EPOLLIN)
            # Buffers posted before DRIVER_OK (or notifies that raced activation).
            self._guard(self.on_timer)
            while self._state is DeviceState.ACTIVE and not self.stopping:
                delay = self._next_delay()
                deadline = None if delay is None else time.monotonic() + delay
                events = ep.poll(-1 if delay is None else max(delay, MIN_TIMER_WAIT))
                for fd, _ in events:
                    if fd == self._stop_fd or self.stopping:
                        return
                    if fd == self._wake_fd:
                        _drain(fd)
                        self._guard(self.on_timer)
                    elif fd in by_fd:
                        self._guard(by_fd[fd])
                    if self._state is not DeviceState.ACTIVE:
                        return
                if deadline is not None and time.monotonic() >= deadline:
                    self._guard(self.on_timer)
        except Exception:  # epoll itself failing: never let the thread die silently
            log.exception("%s: I/O loop failed", self.source)
            self._fail("device fault: I/O loop failed")
        finally:
            ep.close()

    def _next_delay(self) -> float | None:
        try:
            delay = self.next_wakeup()
        except Exception:
            log.exception("%s: next_wakeup failed", self.source)
            return None
        return None if delay is None else max(delay, 0.0)


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _queue_handler(dev: VirtioDevice, index: int) -> Callable[[], None]:
    fd = dev._notify_fds[index]

    def handle() -> None:
        _drain(fd)
        dev.stats.notifications += 1
        dev._process(index)

    return handle

