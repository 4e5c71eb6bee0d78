"""The serial input reader: feeding, EOF, stop, backpressure, raw mode."""

from __future__ import annotations

import os
import pty
import socket
import termios
import threading
import time
from collections.abc import Callable

import pytest

from isovisor.devices.irq import RecordingLine
from isovisor.devices.legacy.serial_input import SerialInput, enter_raw_mode, raw_mode
from isovisor.devices.legacy.uart import Uart16550


class Target:
    """A UART stand-in with an adjustable amount of room."""

    def __init__(self, room: int = 1 << 20) -> None:
        self.data = bytearray()
        self.room = room
        self.fed = threading.Event()
        self.lock = threading.Lock()

    def feed(self, data: bytes) -> int:
        with self.lock:
            assert len(data) <= self.room
            self.data += data
            self.room -= len(data)
        self.fed.set()
        return len(data)

    def rx_room(self) -> int:
        with self.lock:
            return self.room


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError("condition not reached")


def test_reads_until_eof() -> None:
    r, w = os.pipe()
    target = Target()
    reader = SerialInput(r, target)
    reader.start()
    os.write(w, b"hello ")
    os.write(w, b"world")
    os.close(w)
    reader.join(5)
    assert not reader.running
    assert reader.eof
    assert bytes(target.data) == b"hello world"
    assert reader.bytes_read == 11
    assert reader.stop()
    os.close(r)


def test_stop_wakes_an_idle_reader_promptly() -> None:
    r, w = os.pipe()
    reader = SerialInput(r, Target())
    reader.start()
    time.sleep(0.05)
    start = time.monotonic()
    assert reader.stop()
    assert time.monotonic() - start < 1.0
    assert not reader.eof
    assert reader.stop()  # idempotent
    os.close(r)
    os.close(w)


def test_stop_while_target_is_full() -> None:
    r, w = os.pipe()
    target = Target(room=0)
    reader = SerialInput(r, target)
    reader.start()
    os.write(w, b"waiting")
    time.sleep(0.05)
    assert target.data == b""
    assert reader.stop()
    os.close(r)
    os.close(w)


def test_backpressure_never_over_feeds() -> None:
    r, w = os.pipe()
    target = Target(room=3)
    reader = SerialInput(r, target)
    reader.start()
    os.write(w, b"abcdefgh")
    wait_for(lambda: len(target.data) == 3)
    time.sleep(0.05)
    assert bytes(target.data) == b"abc"  # the rest waits in the pipe, not dropped
    with target.lock:
        target.room = 100
    os.close(w)
    reader.join(5)
    assert bytes(target.data) == b"abcdefgh"
    reader.stop()
    os.close(r)


def test_feeds_a_real_uart_from_a_socket() -> None:
    a, b = socket.socketpair()
    dev = Uart16550(RecordingLine(), rx_buffer_limit=16)
    reader = SerialInput(b.fileno(), dev)
    reader.start()
    payload = bytes(range(256)) * 4  # far more than the UART queues: backpressure
    a.sendall(payload)
    got = bytearray()
    deadline = time.monotonic() + 10
    while len(got) < len(payload) and time.monotonic() < deadline:
        if dev.read(5, 1)[0] & 0x01:
            got += dev.read(0, 1)
        else:
            time.sleep(0.001)
    assert bytes(got) == payload
    assert dev.stats.rx_dropped == 0
    a.close()
    reader.join(5)
    assert reader.eof
    reader.stop()
    b.close()


def test_raw_mode_on_a_pty_is_restored() -> None:
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ICANON
        with raw_mode(slave):
            during = termios.tcgetattr(slave)
            assert not during[3] & termios.ICANON
            assert not during[3] & termios.ECHO
            assert during[3] & termios.ISIG  # Ctrl-C still reaches the VMM
        assert termios.tcgetattr(slave) == before
        restore = enter_raw_mode(slave, keep_signals=False)
        assert not termios.tcgetattr(slave)[3] & termios.ISIG
        restore()
        restore()
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_raw_mode_is_a_noop_off_a_tty() -> None:
    r, w = os.pipe()
    try:
        with raw_mode(r):
            pass
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("chunks", [[b"x" * 10_000], [b"a", b"b", b"c"]])
def test_many_chunks(chunks: list[bytes]) -> None:
    r, w = os.pipe()
    target = Target()
    reader = SerialInput(r, target)
    reader.start()
    for chunk in chunks:
        os.write(w, chunk)
    os.close(w)
    reader.join(5)
    assert bytes(target.data) == b"".join(chunks)
    reader.stop()
    os.close(r)
