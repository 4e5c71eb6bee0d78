"""A 16550A UART (the PC's COM ports), modelled from the National/TI 16550D datasheet.

The guest sees eight byte-wide registers. Transmission is instantaneous: a byte written
to THR goes straight to the output sink (or, in loopback, to the receiver), so THR and
the transmitter are always empty (LSR.THRE and LSR.TEMT stay set).

Receive path: host input (`feed`) lands in a bounded host-side queue and moves into the
receive FIFO (16 bytes, or a 1-byte holding register with FIFOs off) whenever there is
room; host input is therefore flow-controlled, not overrun. An overrun (LSR.OE) happens
only when bytes are really lost: a loopback byte arriving at a full FIFO, or host input
beyond the host-side limit.

Interrupts follow the datasheet's priorities, and the output line carries "an enabled
interrupt is pending" as a level. Nothing a guest writes can raise out of `read`/`write`:
accesses are handled one byte (one register) at a time, bytes beyond the eight
registers read as all-ones and are ignored on write, and accesses wider than 8 bytes (no
CPU makes them) are ignored whole.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from isovisor.devices.irq import InterruptLine

log = logging.getLogger(__name__)

# Register offsets from the base port.
RBR_THR_DLL = 0  # read: receiver buffer; write: transmitter holding; DLAB=1: divisor low
IER_DLM = 1  # interrupt enable; DLAB=1: divisor latch high
IIR_FCR = 2  # read: interrupt identification; write: FIFO control
LCR = 3  # line control
MCR = 4  # modem control
LSR = 5  # line status
MSR = 6  # modem status
SCR = 7  # scratch
REGISTER_COUNT = 8
MAX_ACCESS = 8  # the widest access a CPU makes; each byte is one register

# IER bits.
IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F  # the upper nibble is always zero on a 16550A

# IIR values (bit 0 clear = an interrupt is pending), highest priority first.
IIR_NONE = 0x01
IIR_RLS = 0x06  # receiver line status: OE/PE/FE/BI
IIR_RDA = 0x04  # received data at or above the FIFO trigger level
IIR_TIMEOUT = 0x0C  # FIFO holds data below the trigger level (reported at once: no line timing)
IIR_THRE = 0x02  # transmitter holding register empty
IIR_MSI = 0x00  # modem status change
IIR_FIFO_BITS = 0xC0  # both set while FIFOs are enabled: identifies a 16550A

# FCR bits.
FCR_ENABLE = 0x01
FCR_RX_RESET = 0x02
FCR_TX_RESET = 0x04
FCR_TRIGGER_SHIFT = 6
RX_TRIGGER_LEVELS = (1, 4, 8, 14)

# LCR bits.
LCR_DLAB = 0x80  # divisor latch access

# MCR bits.
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR bits.
LSR_DR = 0x01  # data ready
LSR_OE = 0x02  # overrun error
LSR_PE = 0x04  # parity error (never produced here)
LSR_FE = 0x08  # framing error (never produced here)
LSR_BI = 0x10  # break interrupt (never produced here)
LSR_THRE = 0x20  # transmitter holding register empty
LSR_TEMT = 0x40  # transmitter empty
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI  # cleared by reading LSR

# MSR bits: deltas in the low nibble (cleared by reading MSR), line states in the high one.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04  # trailing edge of ring indicator
MSR_DDCD = 0x08
MSR_DELTAS = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
# With no modem attached, report a present, ready peer (what QEMU and Firecracker do).
MSR_IDLE_INPUTS = MSR_CTS | MSR_DSR | MSR_DCD

FIFO_SIZE = 16
DEFAULT_DIVISOR = 0x000C  # 9600 baud from the 1.8432 MHz reference clock

# Host input waiting for room in the receive FIFO. Bounded so a host-side producer (a
# pasted file, a chatty socket) cannot grow the VMM's memory while the guest ignores it.
RX_BUFFER_LIMIT = 64 * 1024


class TxSink(Protocol):
    """Where transmitted bytes go (see `serial_output.SerialOutput`)."""

    def write(self, data: bytes) -> None: ...


@dataclass
class UartStats:
    tx_bytes: int = 0  # bytes handed to the sink
    rx_bytes: int = 0  # host bytes accepted by `feed`
    rx_dropped: int = 0  # host bytes refused: host-side queue full
    overruns: int = 0  # receive overruns the guest saw as LSR.OE
    sink_errors: int = 0  # the sink raised; the byte is lost
    irq_errors: int = 0  # the interrupt line raised


class Uart16550:
    """One 16550A. Register it on the port bus with length `REGISTER_COUNT`."""

    def __init__(
        self,
        irq: InterruptLine,
        sink: TxSink | None = None,
        rx_buffer_limit: int = RX_BUFFER_LIMIT,
    ) -> None:
        self._irq = irq
        self._sink = sink
        self._rx_limit = max(rx_buffer_limit, 0)
        self._lock = threading.Lock()
        self._host_rx: deque[int] = deque()
        self._rx_fifo: deque[int] = deque()
        self._irq_level = False
        self.stats = UartStats()
        self._reset_registers()

    def _reset_registers(self) -> None:
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._divisor = DEFAULT_DIVISOR
        self._fifo_enabled = False
        self._rx_trigger = RX_TRIGGER_LEVELS[0]
        self._line_errors = 0  # LSR error bits latched until LSR is read
        self._msr_inputs = MSR_IDLE_INPUTS
        self._msr_deltas = 0
        self._thr_ipending = False
        self._rx_fifo.clear()

    # -- host side --------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were accepted.

        Bytes beyond the host-side limit are dropped, counted, and reported to the guest
        as an overrun (LSR.OE), since they are lost to it.
        """
        with self._lock:
            room = self._rx_limit - len(self._host_rx)
            accepted = max(0, min(len(data), room))
            self._host_rx.extend(data[:accepted])
            self.stats.rx_bytes += accepted
            dropped = len(data) - accepted
            if dropped:
                self.stats.rx_dropped += dropped
                self._overrun()
            self._pump_rx()
            self._update_irq()
            return accepted

    def rx_room(self) -> int:
        """How many bytes `feed` would accept now (for readers that want backpressure)."""
        with self._lock:
            return max(0, self._rx_limit - len(self._host_rx))

    def interrupt_pending(self) -> bool:
        """Whether an enabled interrupt is pending: the level the IRQ line should carry."""
        with self._lock:
            return self._interrupt_id() != IIR_NONE

    def reset(self) -> None:
        """Power-on register state (a VM reset).

        The receiver is emptied; input still queued host-side is kept and flows in.
        """
        with self._lock:
            self._reset_registers()
            self._pump_rx()
            self._update_irq()

    # -- guest side (BusDevice) -------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if not 0 < size <= MAX_ACCESS:
            return b"\xff" * max(size, 0)  # not an access a CPU makes: no side effects
        with self._lock:
            out = bytearray()
            for i in range(size):
                reg = offset + i
                out.append(self._read_register(reg) if 0 <= reg < REGISTER_COUNT else 0xFF)
            self._update_irq()
            return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        if len(data) > MAX_ACCESS:
            return
        with self._lock:
            for i, value in enumerate(data):
                reg = offset + i
                if 0 <= reg < REGISTER_COUNT:
                    self._write_register(reg, value)
            self._update_irq()

    # -- registers (lock held) --------------------------------------------------------

    def _read_register(self, reg: int) -> int:
        dlab = bool(self._lcr & LCR_DLAB)
        if reg == RBR_THR_DLL:
            return self._divisor & 0xFF if dlab else self._read_rbr()
        if reg == IER_DLM:
            return self._divisor >> 8 if dlab else self._ier
        if reg == IIR_FCR:
            return self._read_iir()
        if reg == LCR:
            return self._lcr
        if reg == MCR:
            return self._mcr
        if reg == LSR:
            value = self._lsr()
            self._line_errors = 0
            return value
        if reg == MSR:
            value = self._msr_inputs | self._msr_deltas
            self._msr_deltas = 0
            return value
        return self._scr

    def _write_register(self, reg: int, value: int) -> None:
        dlab = bool(self._lcr & LCR_DLAB)
        if reg == RBR_THR_DLL:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._write_thr(value)
        elif reg == IER_DLM:
            if dlab:
                self._divisor = (self._divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value)
        elif reg == IIR_FCR:
            self._write_fcr(value)
        elif reg == LCR:
            self._lcr = value
        elif reg == MCR:
            self._write_mcr(value)
        elif reg == SCR:
            self._scr = value
        # LSR and MSR are read-only (factory test writes): ignored.

    def _read_rbr(self) -> int:
        value = self._rx_fifo.popleft() if self._rx_fifo else 0
        self._pump_rx()
        return value

    def _read_iir(self) -> int:
        source = self._interrupt_id()
        if source == IIR_THRE:
            self._thr_ipending = False  # reading IIR acknowledges THR-empty
        return source | (IIR_FIFO_BITS if self._fifo_enabled else 0)

    def _lsr(self) -> int:
        value = LSR_THRE | LSR_TEMT | self._line_errors
        if self._rx_fifo:
            value |= LSR_DR
        return value

    def _write_thr(self, value: int) -> None:
        # Writing THR acknowledges THR-empty; drop the line first so that the instant
        # re-arm below is a fresh edge for the (edge-triggered) irqchip pin.
        self._thr_ipending = False
        self._update_irq()
        if self._mcr & MCR_LOOP:
            self._rx_push(value)
        else:
            self._transmit(value)
        self._thr_ipending = True

    def _write_ier(self, value: int) -> None:
        value &= IER_MASK
        rising = value & ~self._ier & IER_ETBEI
        self._ier = value
        if rising:
            # THR is always empty here; enabling ETBEI raises THR-empty at once
            # (Linux's 8250 start-up probes this and works around UARTs that do not).
            self._thr_ipending = True
        elif not value & IER_ETBEI:
            self._thr_ipending = False

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE)
        if enable != self._fifo_enabled:
            self._rx_fifo.clear()  # changing FCR0 clears both FIFOs
        self._fifo_enabled = enable
        if enable:
            # The other bits only take effect with FCR0 set in the same write.
            if value & FCR_RX_RESET:
                self._rx_fifo.clear()
            # FCR_TX_RESET: the transmitter is always empty; nothing to clear.
            self._rx_trigger = RX_TRIGGER_LEVELS[(value >> FCR_TRIGGER_SHIFT) & 0x3]
        else:
            self._rx_trigger = RX_TRIGGER_LEVELS[0]
        self._pump_rx()

    def _write_mcr(self, value: int) -> None:
        self._mcr = value & MCR_MASK
        self._set_modem_inputs(self._modem_inputs())
        self._pump_rx()  # leaving loopback reconnects the host input

    # -- internals (lock held) --------------------------------------------------------

    def _modem_inputs(self) -> int:
        if not self._mcr & MCR_LOOP:
            return MSR_IDLE_INPUTS
        # Loopback wires the modem outputs to the modem inputs.
        inputs = 0
        if self._mcr & MCR_RTS:
            inputs |= MSR_CTS
        if self._mcr & MCR_DTR:
            inputs |= MSR_DSR
        if self._mcr & MCR_OUT1:
            inputs |= MSR_RI
        if self._mcr & MCR_OUT2:
            inputs |= MSR_DCD
        return inputs

    def _set_modem_inputs(self, inputs: int) -> None:
        changed = inputs ^ self._msr_inputs
        if changed & MSR_CTS:
            self._msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_deltas |= MSR_DDSR
        if changed & MSR_DCD:
            self._msr_deltas |= MSR_DDCD
        if changed & MSR_RI and not inputs & MSR_RI:
            self._msr_deltas |= MSR_TERI
        self._msr_inputs = inputs

    def _rx_capacity(self) -> int:
        return FIFO_SIZE if self._fifo_enabled else 1

    def _pump_rx(self) -> None:
        """Move host input into the receive FIFO while it has room (not in loopback)."""
        if self._mcr & MCR_LOOP:
            return  # loopback disconnects the serial input from the receiver
        room = self._rx_capacity() - len(self._rx_fifo)
        while room > 0 and self._host_rx:
            self._rx_fifo.append(self._host_rx.popleft())
            room -= 1

    def _rx_push(self, value: int) -> None:
        """A character arrives at the receiver (loopback)."""
        if len(self._rx_fifo) < self._rx_capacity():
            self._rx_fifo.append(value)
            return
        self._overrun()
        if not self._fifo_enabled:
            self._rx_fifo[-1] = value  # the holding register is overwritten
        # FIFO mode: the character in the shift register is lost, the FIFO is kept.

    def _overrun(self) -> None:
        self._line_errors |= LSR_OE
        self.stats.overruns += 1

    def _transmit(self, value: int) -> None:
        if self._sink is None:
            return
        try:
            self._sink.write(bytes((value,)))
        except Exception:
            self.stats.sink_errors += 1
            if self.stats.sink_errors == 1:
                log.exception("uart: output sink failed; further failures are only counted")
            return
        self.stats.tx_bytes += 1

    def _interrupt_id(self) -> int:
        """The highest-priority enabled pending interrupt, as an IIR identification."""
        if self._ier & IER_ELSI and self._line_errors:
            return IIR_RLS
        if self._ier & IER_ERBFI and self._rx_fifo:
            if self._fifo_enabled and len(self._rx_fifo) < self._rx_trigger:
                return IIR_TIMEOUT
            return IIR_RDA
        if self._ier & IER_ETBEI and self._thr_ipending:
            return IIR_THRE
        if self._ier & IER_EDSSI and self._msr_deltas:
            return IIR_MSI
        return IIR_NONE

    def _update_irq(self) -> None:
        level = self._interrupt_id() != IIR_NONE
        if level == self._irq_level:
            return
        self._irq_level = level
        try:
            self._irq.set(level)
        except Exception:
            self.stats.irq_errors += 1
            if self.stats.irq_errors == 1:
                log.exception("uart: interrupt line failed; further failures are only counted")
