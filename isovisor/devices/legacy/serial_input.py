"""Host input for a guest's serial port: a reader thread from an fd into the UART.

The thread polls the input fd together with a self-pipe, so `stop()` wakes it at once
whatever the input is doing. It honours the UART's backpressure: it reads only as many
bytes as the UART's host-side queue has room for, and waits (still stoppable) while the
queue is full, so piped input is never dropped. It ends on EOF, on a hang-up, on a read
error, or on `stop()`. The caller owns the input fd; the thread never closes it.

`raw_mode` puts a terminal into raw mode for an interactive console and restores it on
exit (also from `atexit`, in case the process leaves without unwinding).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import select
import termios
import threading
import tty
from collections.abc import Callable, Iterator
from typing import Protocol

log = logging.getLogger(__name__)

READ_CHUNK = 4096  # bytes per read(2)
FULL_WAIT = 0.01  # seconds between checks while the UART's queue is full
STOP_TIMEOUT = 5.0  # seconds `stop()` waits for the thread


class RxTarget(Protocol):
    """What the reader feeds (`uart.Uart16550`)."""

    def feed(self, data: bytes) -> int: ...

    def rx_room(self) -> int: ...


class SerialInput:
    """Reads `fd` on a daemon thread and feeds `target` until EOF or `stop()`."""

    def __init__(self, fd: int, target: RxTarget, *, name: str = "serial-input") -> None:
        self._fd = fd
        self._target = target
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._stop_w, False)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._lock = threading.Lock()
        self._closed = False
        self.bytes_read = 0
        self.eof = False  # the input ended (EOF, hang-up or error), not a stop()

    def start(self) -> None:
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop the thread and release the self-pipe; returns whether it has ended."""
        with self._lock:
            if self._closed:
                return not self._thread.is_alive()
            with contextlib.suppress(BlockingIOError):
                os.write(self._stop_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout)
        ended = not self._thread.is_alive()
        if ended:
            self._close_pipe()
        return ended

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end by itself (EOF)."""
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _close_pipe(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._stop_r)
                os.close(self._stop_w)

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("serial input: reader failed")
            self.eof = True

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            room = self._target.rx_room()
            if room <= 0:
                if self._stop_requested(FULL_WAIT):
                    return
                continue
            events = dict(poller.poll())
            if self._stop_r in events:
                return
            if self._fd not in events:
                continue
            if events[self._fd] & select.POLLNVAL:
                self.eof = True
                return
            try:
                data = os.read(self._fd, min(room, READ_CHUNK))
            except BlockingIOError:
                continue
            except OSError as exc:
                log.warning("serial input: read failed: %s", exc)
                self.eof = True
                return
            if not data:
                self.eof = True
                return
            self.bytes_read += len(data)
            self._target.feed(data)

    def _stop_requested(self, timeout: float) -> bool:
        ready, _, _ = select.select([self._stop_r], [], [], timeout)
        return bool(ready)


@contextlib.contextmanager
def raw_mode(fd: int, *, keep_signals: bool = True) -> Iterator[None]:
    """Put the terminal `fd` in raw mode for the block; a no-op if `fd` is not a TTY.

    With `keep_signals`, Ctrl-C and friends still signal the VMM instead of reaching
    the guest.
    """
    restore = enter_raw_mode(fd, keep_signals=keep_signals)
    try:
        yield
    finally:
        restore()


def enter_raw_mode(fd: int, *, keep_signals: bool = True) -> Callable[[], None]:
    """Put `fd` in raw mode; returns an idempotent restore, also registered with atexit."""
    if not os.isatty(fd):
        return lambda: None
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    if keep_signals:
        attrs = termios.tcgetattr(fd)
        attrs[3] |= termios.ISIG  # lflag
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    done = False

    def restore() -> None:
        nonlocal done
        if done:
            return
        done = True
        atexit.unregister(restore)
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    atexit.register(restore)
    return restore
