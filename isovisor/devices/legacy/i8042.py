"""An i8042 keyboard controller with nothing behind it: enough for reset and probing.

The controller answers the commands Linux and firmware send while probing (self-tests,
the command byte, port enable/disable, loopback writes) and carries the CPU reset line:
command 0xFE (pulse output line 0) and command 0xD1 with bit 0 clear (write the output
port with reset asserted) call `reset_callback`. There is no keyboard or mouse, so no
interrupt line; responses are polled through the status register's OBF bit.

Port mapping: the controller's two ports are not adjacent (0x60 data, 0x64 status and
command), so `I8042` exposes two one-byte bus devices, `data_port` and `command_port`:

    bus.register(I8042_DATA_PORT, 1, kbc.data_port, "i8042-data")
    bus.register(I8042_COMMAND_PORT, 1, kbc.command_port, "i8042-command")

Each accepts only 1-byte accesses at offset 0; anything else reads as all-ones and is
ignored on write, without side effects.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64

# Status register bits.
STATUS_OBF = 0x01  # output buffer full: a byte waits at the data port
STATUS_IBF = 0x02  # input buffer full (never: commands complete at once)
STATUS_SYS = 0x04  # system flag: self-test passed (mirrors command byte bit 2)
STATUS_CMD = 0x08  # the last write went to the command port
STATUS_UNLOCKED = 0x10  # keyboard not inhibited
STATUS_AUX_OBF = 0x20  # the waiting byte comes from the auxiliary (mouse) port

# Command byte (controller RAM byte 0) bits.
CB_KBD_INT = 0x01  # keyboard interrupt enable
CB_AUX_INT = 0x02  # auxiliary interrupt enable
CB_SYS = 0x04  # system flag
CB_KBD_DISABLE = 0x10  # keyboard clock disabled
CB_AUX_DISABLE = 0x20  # auxiliary clock disabled
CB_XLATE = 0x40  # scancode translation
DEFAULT_COMMAND_BYTE = CB_KBD_INT | CB_SYS | CB_XLATE

# Output port bits.
OUTPUT_RESET = 0x01  # active low: clearing it resets the CPU
OUTPUT_A20 = 0x02  # A20 gate
DEFAULT_OUTPUT_PORT = OUTPUT_RESET | OUTPUT_A20

# Controller commands (written to the command port).
CMD_READ_RAM = 0x20  # 0x20..0x3F: read RAM byte (cmd & 0x1F); 0x20 is the command byte
CMD_WRITE_RAM = 0x60  # 0x60..0x7F: write RAM byte; 0x60 writes the command byte
RAM_SIZE = 0x20
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_INPUT_PORT = 0xC0
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KBD_OUTPUT = 0xD2  # the next data byte comes back as if from the keyboard
CMD_WRITE_AUX_OUTPUT = 0xD3  # ... as if from the mouse (Linux's AUX loopback test)
CMD_WRITE_AUX = 0xD4  # the next data byte goes to the mouse (there is none)
CMD_DISABLE_A20 = 0xDD
CMD_ENABLE_A20 = 0xDF
CMD_PULSE_FIRST = 0xF0  # 0xF0..0xFF: pulse output lines whose bit is clear; 0xFE = reset

SELF_TEST_OK = 0x55
INTERFACE_TEST_OK = 0x00
INPUT_PORT_VALUE = 0x00

# Responses queued and not read. The guest reads what it asked for; a guest issuing
# commands without reading gets its later responses dropped rather than growing memory.
OUTPUT_QUEUE_LIMIT = 16

# Commands whose next data-port byte is their parameter.
_TAKES_PARAMETER = frozenset(
    {CMD_WRITE_OUTPUT_PORT, CMD_WRITE_KBD_OUTPUT, CMD_WRITE_AUX_OUTPUT, CMD_WRITE_AUX}
)


class I8042:
    """The controller. `reset_callback` is called (outside the lock) on a reset request."""

    def __init__(self, reset_callback: Callable[[], None]) -> None:
        self._reset_callback = reset_callback
        self._lock = threading.Lock()
        self._ram = bytearray(RAM_SIZE)
        self._ram[0] = DEFAULT_COMMAND_BYTE
        self._output_port = DEFAULT_OUTPUT_PORT
        self._outq: deque[tuple[int, bool]] = deque()  # (byte, from the aux port)
        self._last_output = 0  # re-read when the queue is empty, as hardware does
        self._last_write_was_command = True
        self._pending: int | None = None  # a command awaiting its data byte
        self.resets_requested = 0
        self.dropped_responses = 0
        self.data_port = _Port(self._read_data, self._write_data)
        self.command_port = _Port(self._read_status, self._write_command)

    def reset(self) -> None:
        """Power-on state (a VM reset)."""
        with self._lock:
            self._ram[:] = bytes(RAM_SIZE)
            self._ram[0] = DEFAULT_COMMAND_BYTE
            self._output_port = DEFAULT_OUTPUT_PORT
            self._outq.clear()
            self._last_output = 0
            self._last_write_was_command = True
            self._pending = None

    @property
    def command_byte(self) -> int:
        with self._lock:
            return self._ram[0]

    # -- ports (called by the adapters) -----------------------------------------------

    def _read_data(self) -> int:
        with self._lock:
            if self._outq:
                self._last_output = self._outq.popleft()[0]
            return self._last_output

    def _read_status(self) -> int:
        with self._lock:
            status = STATUS_UNLOCKED
            if self._ram[0] & CB_SYS:
                status |= STATUS_SYS
            if self._last_write_was_command:
                status |= STATUS_CMD
            if self._outq:
                status |= STATUS_OBF
                if self._outq[0][1]:
                    status |= STATUS_AUX_OBF
            return status

    def _write_data(self, value: int) -> None:
        reset = False
        with self._lock:
            self._last_write_was_command = False
            command, self._pending = self._pending, None
            if command is None:
                return  # a byte for the keyboard: there is none
            if CMD_WRITE_RAM <= command < CMD_WRITE_RAM + RAM_SIZE:
                self._ram[command - CMD_WRITE_RAM] = value
            elif command == CMD_WRITE_OUTPUT_PORT:
                self._output_port = value
                reset = not value & OUTPUT_RESET
            elif command == CMD_WRITE_KBD_OUTPUT:
                self._respond(value)
            elif command == CMD_WRITE_AUX_OUTPUT:
                self._respond(value, aux=True)
            # CMD_WRITE_AUX: a byte for the mouse: there is none.
        if reset:
            self._request_reset()

    def _write_command(self, command: int) -> None:
        reset = False
        with self._lock:
            self._last_write_was_command = True
            self._pending = None
            if CMD_READ_RAM <= command < CMD_READ_RAM + RAM_SIZE:
                self._respond(self._ram[command - CMD_READ_RAM])
            elif self._takes_parameter(command):
                self._pending = command
            elif command >= CMD_PULSE_FIRST:
                reset = not command & OUTPUT_RESET  # a clear bit pulses that line
            else:
                self._simple_command(command)
        if reset:
            self._request_reset()

    # -- internals --------------------------------------------------------------------

    @staticmethod
    def _takes_parameter(command: int) -> bool:
        return CMD_WRITE_RAM <= command < CMD_WRITE_RAM + RAM_SIZE or command in _TAKES_PARAMETER

    def _simple_command(self, command: int) -> None:
        """Commands without a parameter (lock held). Unknown commands are ignored."""
        if command == CMD_SELF_TEST:
            self._ram[0] |= CB_SYS
            self._respond(SELF_TEST_OK)
        elif command in (CMD_KBD_TEST, CMD_AUX_TEST):
            self._respond(INTERFACE_TEST_OK)
        elif command == CMD_KBD_DISABLE:
            self._ram[0] |= CB_KBD_DISABLE
        elif command == CMD_KBD_ENABLE:
            self._ram[0] &= ~CB_KBD_DISABLE & 0xFF
        elif command == CMD_AUX_DISABLE:
            self._ram[0] |= CB_AUX_DISABLE
        elif command == CMD_AUX_ENABLE:
            self._ram[0] &= ~CB_AUX_DISABLE & 0xFF
        elif command == CMD_READ_INPUT_PORT:
            self._respond(INPUT_PORT_VALUE)
        elif command == CMD_READ_OUTPUT_PORT:
            self._respond(self._output_port)
        elif command == CMD_DISABLE_A20:
            self._output_port &= ~OUTPUT_A20 & 0xFF
        elif command == CMD_ENABLE_A20:
            self._output_port |= OUTPUT_A20

    def _respond(self, value: int, aux: bool = False) -> None:
        if len(self._outq) >= OUTPUT_QUEUE_LIMIT:
            self.dropped_responses += 1
            return
        self._outq.append((value, aux))

    def _request_reset(self) -> None:
        with self._lock:
            self.resets_requested += 1
        try:
            self._reset_callback()
        except Exception:
            log.exception("i8042: reset callback failed")


class _Port:
    """A one-byte bus device forwarding to one of the controller's ports."""

    def __init__(self, reader: Callable[[], int], writer: Callable[[int], None]) -> None:
        self._reader = reader
        self._writer = writer

    def read(self, offset: int, size: int) -> bytes:
        if offset != 0 or size != 1:
            return b"\xff" * max(size, 0)
        return bytes((self._reader() & 0xFF,))

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) == 1:
            self._writer(data[0])
