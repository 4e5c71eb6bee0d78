"""16550A UART register interface (COM1) and its host-input path (serial input)."""

from __future__ import annotations

from fuzz import traffic
from fuzz.data import Data
from isovisor.devices.irq import RecordingLine
from isovisor.devices.legacy.uart import REGISTER_COUNT, Uart16550

COVERS = ("pio:com1",)
RX_LIMIT = 64  # small, so the host-side limit is reached within a few inputs


class Sink:
    def __init__(self) -> None:
        self.n = 0

    def write(self, data: bytes) -> None:
        self.n += len(data)


def one_input(data: bytes) -> None:
    d = Data(data)
    uart = Uart16550(RecordingLine(), Sink(), rx_buffer_limit=RX_LIMIT)

    def host(d: Data) -> None:
        chunk = d.blob(4 * RX_LIMIT)
        before = len(uart._host_rx)
        accepted = uart.feed(chunk)
        assert 0 <= accepted <= len(chunk)
        assert len(uart._host_rx) <= RX_LIMIT, "host-side receive queue passed its limit"
        assert accepted <= RX_LIMIT - before + uart._rx_capacity()

    traffic.run(d, [(uart, REGISTER_COUNT)], host_op=host)
    assert len(uart._host_rx) <= RX_LIMIT
    assert len(uart._rx_fifo) <= 16
