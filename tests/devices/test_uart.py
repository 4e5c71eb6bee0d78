"""The 16550A model: registers, FIFOs, loopback, interrupts, host input bounds."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from isovisor.devices.irq import RecordingLine
from isovisor.devices.legacy import uart as u
from isovisor.devices.legacy.uart import Uart16550


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def make(limit: int = u.RX_BUFFER_LIMIT) -> tuple[Uart16550, RecordingLine, Sink]:
    line = RecordingLine()
    sink = Sink()
    return Uart16550(line, sink, rx_buffer_limit=limit), line, sink


def rd(dev: Uart16550, reg: int) -> int:
    return dev.read(reg, 1)[0]


def wr(dev: Uart16550, reg: int, value: int) -> None:
    dev.write(reg, bytes((value,)))


def test_reset_values() -> None:
    dev, line, _ = make()
    assert rd(dev, u.IER_DLM) == 0
    assert rd(dev, u.IIR_FCR) == u.IIR_NONE
    assert rd(dev, u.LCR) == 0
    assert rd(dev, u.MCR) == 0
    assert rd(dev, u.LSR) == u.LSR_THRE | u.LSR_TEMT
    assert rd(dev, u.MSR) == u.MSR_CTS | u.MSR_DSR | u.MSR_DCD
    assert line.history == []


def test_thr_goes_to_sink() -> None:
    dev, _, sink = make()
    for b in b"hello\n":
        wr(dev, u.RBR_THR_DLL, b)
    assert bytes(sink.data) == b"hello\n"
    assert dev.stats.tx_bytes == 6


def test_dlab_switches_divisor_latch() -> None:
    dev, _, sink = make()
    wr(dev, u.IER_DLM, 0x05)
    wr(dev, u.LCR, u.LCR_DLAB | 0x03)
    assert rd(dev, u.RBR_THR_DLL) == u.DEFAULT_DIVISOR & 0xFF
    wr(dev, u.RBR_THR_DLL, 0x01)  # divisor 115200 baud: not a transmitted byte
    wr(dev, u.IER_DLM, 0x00)
    assert rd(dev, u.RBR_THR_DLL) == 0x01
    assert rd(dev, u.IER_DLM) == 0x00
    wr(dev, u.LCR, 0x03)
    assert rd(dev, u.IER_DLM) == 0x05  # IER untouched by the DLM write
    assert rd(dev, u.LCR) == 0x03
    assert sink.data == b""


def test_ier_upper_bits_read_as_zero_and_scratch_holds() -> None:
    dev, _, _ = make()
    wr(dev, u.IER_DLM, 0xFF)
    assert rd(dev, u.IER_DLM) == 0x0F
    wr(dev, u.SCR, 0xA5)
    assert rd(dev, u.SCR) == 0xA5


def test_thre_interrupt_on_enabling_etbei_and_reassert_after_ack() -> None:
    dev, line, _ = make()
    wr(dev, u.IER_DLM, u.IER_ETBEI)
    assert line.level
    assert rd(dev, u.IIR_FCR) == u.IIR_THRE
    # Reading IIR with THRE as the source acknowledges it.
    assert not line.level
    assert rd(dev, u.IIR_FCR) == u.IIR_NONE
    # Linux's UART_BUG_THRE probe: IER=0 then ETBEI again must re-raise THRE.
    wr(dev, u.IER_DLM, 0)
    wr(dev, u.IER_DLM, u.IER_ETBEI)
    assert line.level
    assert rd(dev, u.IIR_FCR) == u.IIR_THRE


def test_thre_rewriting_ier_without_rising_edge_does_not_rearm() -> None:
    dev, line, _ = make()
    wr(dev, u.IER_DLM, u.IER_ETBEI)
    rd(dev, u.IIR_FCR)
    wr(dev, u.IER_DLM, u.IER_ETBEI | u.IER_ERBFI)
    assert not line.level


def test_thr_write_gives_a_fresh_edge() -> None:
    dev, line, sink = make()
    wr(dev, u.IER_DLM, u.IER_ETBEI)
    assert line.history == [True]
    wr(dev, u.RBR_THR_DLL, ord("x"))  # not acknowledged through IIR: line was high
    assert line.history == [True, False, True]
    assert sink.data == b"x"
    assert rd(dev, u.IIR_FCR) == u.IIR_THRE


def test_receive_data_and_interrupt() -> None:
    dev, line, _ = make()
    wr(dev, u.IER_DLM, u.IER_ERBFI)
    assert not line.level
    assert dev.feed(b"ab") == 2
    assert line.level
    assert rd(dev, u.LSR) & u.LSR_DR
    assert rd(dev, u.IIR_FCR) == u.IIR_RDA
    assert rd(dev, u.RBR_THR_DLL) == ord("a")
    assert line.level  # "b" moved into the holding register
    assert rd(dev, u.RBR_THR_DLL) == ord("b")
    assert not line.level
    assert not rd(dev, u.LSR) & u.LSR_DR


def test_fifo_enable_iir_bits_trigger_and_timeout() -> None:
    dev, _, _ = make()
    wr(dev, u.IIR_FCR, u.FCR_ENABLE | (2 << u.FCR_TRIGGER_SHIFT))  # trigger at 8
    assert rd(dev, u.IIR_FCR) == u.IIR_FIFO_BITS | u.IIR_NONE
    wr(dev, u.IER_DLM, u.IER_ERBFI)
    dev.feed(b"1234")
    assert rd(dev, u.IIR_FCR) == u.IIR_FIFO_BITS | u.IIR_TIMEOUT
    dev.feed(b"5678")
    assert rd(dev, u.IIR_FCR) == u.IIR_FIFO_BITS | u.IIR_RDA
    assert dev.read(u.RBR_THR_DLL, 1) == b"1"


def test_fifo_holds_sixteen_and_host_queue_refills() -> None:
    dev, _, _ = make()
    wr(dev, u.IIR_FCR, u.FCR_ENABLE)
    data = bytes(range(40))
    assert dev.feed(data) == 40
    got = bytearray()
    while rd(dev, u.LSR) & u.LSR_DR:
        got.append(rd(dev, u.RBR_THR_DLL))
    assert bytes(got) == data
    assert dev.stats.overruns == 0  # host input is flow-controlled, never overrun


def test_fifo_rx_reset_clears_received_data() -> None:
    dev, _, _ = make()
    wr(dev, u.IIR_FCR, u.FCR_ENABLE)
    wr(dev, u.MCR, u.MCR_LOOP)
    for b in b"abc":
        wr(dev, u.RBR_THR_DLL, b)
    assert rd(dev, u.LSR) & u.LSR_DR
    wr(dev, u.IIR_FCR, u.FCR_ENABLE | u.FCR_RX_RESET)
    assert not rd(dev, u.LSR) & u.LSR_DR
    # Disabling the FIFOs also clears them.
    wr(dev, u.RBR_THR_DLL, ord("d"))
    wr(dev, u.IIR_FCR, 0)
    assert not rd(dev, u.LSR) & u.LSR_DR
    assert rd(dev, u.IIR_FCR) & u.IIR_FIFO_BITS == 0


def test_loopback_data_and_modem_lines() -> None:
    dev, _, sink = make()
    wr(dev, u.MCR, u.MCR_LOOP | u.MCR_RTS | u.MCR_OUT2)
    dev.feed(b"host")  # host input stays queued while in loopback
    assert not rd(dev, u.LSR) & u.LSR_DR
    assert rd(dev, u.MSR) & 0xF0 == u.MSR_CTS | u.MSR_DCD  # Linux autoconfig expects 0x90
    wr(dev, u.MCR, u.MCR_LOOP | u.MCR_DTR | u.MCR_OUT1)
    msr = rd(dev, u.MSR)
    assert msr & 0xF0 == u.MSR_DSR | u.MSR_RI
    assert msr & u.MSR_DCTS and msr & u.MSR_DDSR and msr & u.MSR_DDCD
    wr(dev, u.MCR, u.MCR_LOOP)
    assert rd(dev, u.MSR) & u.MSR_TERI  # RI fell
    assert rd(dev, u.MSR) & u.MSR_DELTAS == 0  # deltas clear on read
    wr(dev, u.RBR_THR_DLL, ord("L"))
    assert sink.data == b""  # the transmitter is disconnected from the line
    assert rd(dev, u.RBR_THR_DLL) == ord("L")
    wr(dev, u.MCR, 0)
    assert rd(dev, u.MSR) & 0xF0 == u.MSR_IDLE_INPUTS
    got = bytes(rd(dev, u.RBR_THR_DLL) for _ in range(4))
    assert got == b"host"


def test_loopback_overrun_sets_oe_and_drops() -> None:
    dev, line, _ = make()
    wr(dev, u.IIR_FCR, u.FCR_ENABLE)
    wr(dev, u.MCR, u.MCR_LOOP)
    for i in range(u.FIFO_SIZE + 3):
        wr(dev, u.RBR_THR_DLL, i)
    wr(dev, u.IER_DLM, u.IER_ELSI | u.IER_ERBFI)
    assert line.level
    assert rd(dev, u.IIR_FCR) & 0x0F == u.IIR_RLS  # line status outranks data
    lsr = rd(dev, u.LSR)
    assert lsr & u.LSR_OE and lsr & u.LSR_DR
    assert not rd(dev, u.LSR) & u.LSR_OE  # cleared by reading LSR
    assert rd(dev, u.IIR_FCR) & 0x0F == u.IIR_RDA
    assert dev.stats.overruns == 3
    got = [rd(dev, u.RBR_THR_DLL) for _ in range(u.FIFO_SIZE)]
    assert got == list(range(u.FIFO_SIZE))  # the FIFO kept the first sixteen
    assert not rd(dev, u.LSR) & u.LSR_DR


def test_non_fifo_overrun_overwrites_holding_register() -> None:
    dev, _, _ = make()
    wr(dev, u.MCR, u.MCR_LOOP)
    wr(dev, u.RBR_THR_DLL, 1)
    wr(dev, u.RBR_THR_DLL, 2)
    assert rd(dev, u.LSR) & u.LSR_OE
    assert rd(dev, u.RBR_THR_DLL) == 2


def test_host_queue_bound_drops_counts_and_reports_overrun() -> None:
    dev, _, _ = make(limit=32)
    assert dev.feed(bytes(20)) == 20  # one byte moves into the holding register
    assert dev.rx_room() == 13
    assert dev.feed(bytes(20)) == 13
    assert dev.stats.rx_dropped == 7
    assert dev.rx_room() == 0
    assert rd(dev, u.LSR) & u.LSR_OE


def test_interrupt_priority_order() -> None:
    dev, _, _ = make()
    wr(dev, u.IER_DLM, u.IER_MASK)
    wr(dev, u.MCR, u.MCR_LOOP)  # modem status deltas
    wr(dev, u.RBR_THR_DLL, 1)
    wr(dev, u.RBR_THR_DLL, 2)  # overrun
    assert rd(dev, u.IIR_FCR) == u.IIR_RLS
    rd(dev, u.LSR)
    assert rd(dev, u.IIR_FCR) == u.IIR_RDA
    rd(dev, u.RBR_THR_DLL)
    assert rd(dev, u.IIR_FCR) == u.IIR_THRE  # and the read acknowledges it
    assert rd(dev, u.IIR_FCR) == u.IIR_MSI
    rd(dev, u.MSR)
    assert rd(dev, u.IIR_FCR) == u.IIR_NONE


def test_modem_status_interrupt() -> None:
    dev, line, _ = make()
    wr(dev, u.IER_DLM, u.IER_EDSSI)
    wr(dev, u.MCR, u.MCR_LOOP)
    assert line.level
    rd(dev, u.MSR)
    assert not line.level


def test_line_follows_pending_state_without_out2() -> None:
    dev, line, _ = make()
    wr(dev, u.MCR, 0)  # OUT2 clear: interrupts are not gated
    wr(dev, u.IER_DLM, u.IER_ERBFI)
    dev.feed(b"x")
    assert line.level and dev.interrupt_pending()
    wr(dev, u.IER_DLM, 0)
    assert not line.level


def test_multibyte_access_is_bytewise_and_out_of_range_is_ignored() -> None:
    dev, _, sink = make()
    dev.write(u.RBR_THR_DLL, b"A\x0f")  # THR then IER
    assert sink.data == b"A"
    assert rd(dev, u.IER_DLM) == 0x0F
    assert dev.read(u.LSR, 4) == bytes([u.LSR_THRE | u.LSR_TEMT, u.MSR_IDLE_INPUTS, 0x00, 0xFF])
    dev.write(100, b"zz")
    assert dev.read(100, 2) == b"\xff\xff"
    assert dev.read(0, 0) == b""
    dev.write(u.SCR - 8, bytes(9) + b"\x77")  # wider than any CPU access: ignored
    assert rd(dev, u.SCR) == 0
    assert dev.read(0, 16) == b"\xff" * 16


def test_sink_failure_is_contained() -> None:
    class Broken:
        def write(self, data: bytes) -> None:
            raise OSError("gone")

    dev = Uart16550(RecordingLine(), Broken())
    wr(dev, u.RBR_THR_DLL, 1)
    assert dev.stats.sink_errors == 1


def test_reset_restores_registers_and_keeps_host_input() -> None:
    dev, _, _ = make()
    wr(dev, u.LCR, 0x83)
    wr(dev, u.IER_DLM, u.IER_ERBFI)
    dev.feed(b"xyz")  # "x" reaches the holding register, "yz" wait host-side
    dev.reset()  # clears the receiver: "x" is gone, "y" moves in
    assert rd(dev, u.LCR) == 0
    assert rd(dev, u.IER_DLM) == 0
    assert rd(dev, u.IIR_FCR) == u.IIR_NONE
    assert rd(dev, u.RBR_THR_DLL) == ord("y")
    assert rd(dev, u.RBR_THR_DLL) == ord("z")


def test_concurrent_feed_and_reads_lose_nothing() -> None:
    dev, _, _ = make()
    wr(dev, u.IIR_FCR, u.FCR_ENABLE)
    chunks = [bytes([i]) * 100 for i in range(8)]

    def feeder() -> None:
        for chunk in chunks:
            while dev.rx_room() < len(chunk):
                pass
            dev.feed(chunk)

    t = threading.Thread(target=feeder)
    t.start()
    got = bytearray()
    while len(got) < 800:
        if rd(dev, u.LSR) & u.LSR_DR:
            got.append(rd(dev, u.RBR_THR_DLL))
    t.join()
    assert bytes(got) == b"".join(chunks)
    assert dev.stats.rx_dropped == 0


ops = st.one_of(
    st.tuples(st.just("r"), st.integers(-2, 12), st.sampled_from([1, 2, 4, 8]), st.just(b"")),
    st.tuples(st.just("w"), st.integers(-2, 12), st.just(0), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("f"), st.just(0), st.just(0), st.binary(max_size=64)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, max_size=60))
def test_random_accesses_never_raise_and_stay_bounded(
    seq: list[tuple[str, int, int, bytes]],
) -> None:
    dev, line, _ = make(limit=128)
    for kind, offset, size, data in seq:
        if kind == "r":
            assert len(dev.read(offset, size)) == size
        elif kind == "w":
            dev.write(offset, data)
        else:
            assert 0 <= dev.feed(data) <= len(data)
        assert len(dev._rx_fifo) <= u.FIFO_SIZE
        assert len(dev._host_rx) <= 128
        assert line.level == dev.interrupt_pending()
