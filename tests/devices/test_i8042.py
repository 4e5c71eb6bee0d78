"""The i8042 controller: probing commands, the command byte, and the reset line."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from isovisor.devices.bus import pio_bus
from isovisor.devices.legacy import i8042 as k
from isovisor.devices.legacy.i8042 import I8042


class Resets:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def make() -> tuple[I8042, Resets]:
    resets = Resets()
    return I8042(resets), resets


def command(kbc: I8042, cmd: int) -> None:
    kbc.command_port.write(0, bytes((cmd,)))


def data_out(kbc: I8042, value: int) -> None:
    kbc.data_port.write(0, bytes((value,)))


def status(kbc: I8042) -> int:
    return kbc.command_port.read(0, 1)[0]


def data_in(kbc: I8042) -> int:
    return kbc.data_port.read(0, 1)[0]


def test_status_obf_only_when_a_response_waits() -> None:
    kbc, _ = make()
    assert not status(kbc) & k.STATUS_OBF
    command(kbc, k.CMD_SELF_TEST)
    assert status(kbc) & k.STATUS_OBF
    assert data_in(kbc) == k.SELF_TEST_OK
    assert not status(kbc) & k.STATUS_OBF
    assert status(kbc) & k.STATUS_SYS


def test_interface_tests_pass() -> None:
    kbc, _ = make()
    for cmd in (k.CMD_KBD_TEST, k.CMD_AUX_TEST):
        command(kbc, cmd)
        assert status(kbc) & k.STATUS_OBF
        assert data_in(kbc) == 0x00


def test_read_and_write_command_byte() -> None:
    kbc, _ = make()
    command(kbc, k.CMD_READ_RAM)
    assert data_in(kbc) == k.DEFAULT_COMMAND_BYTE
    command(kbc, k.CMD_WRITE_RAM)
    assert status(kbc) & k.STATUS_CMD
    data_out(kbc, 0x65)
    assert not status(kbc) & k.STATUS_CMD
    command(kbc, k.CMD_READ_RAM)
    assert data_in(kbc) == 0x65
    assert kbc.command_byte == 0x65


def test_enable_disable_ports_show_in_command_byte() -> None:
    # Linux's AUX detection checks these bits after 0xA7/0xA8.
    kbc, _ = make()
    command(kbc, k.CMD_AUX_DISABLE)
    command(kbc, k.CMD_KBD_DISABLE)
    assert kbc.command_byte & (k.CB_AUX_DISABLE | k.CB_KBD_DISABLE) == (
        k.CB_AUX_DISABLE | k.CB_KBD_DISABLE
    )
    command(kbc, k.CMD_AUX_ENABLE)
    command(kbc, k.CMD_KBD_ENABLE)
    assert kbc.command_byte & (k.CB_AUX_DISABLE | k.CB_KBD_DISABLE) == 0


def test_aux_loopback_returns_the_byte_as_mouse_data() -> None:
    kbc, _ = make()
    command(kbc, k.CMD_WRITE_AUX_OUTPUT)
    data_out(kbc, 0x5A)
    assert status(kbc) & (k.STATUS_OBF | k.STATUS_AUX_OBF) == k.STATUS_OBF | k.STATUS_AUX_OBF
    assert data_in(kbc) == 0x5A


def test_pulse_reset_fires_callback() -> None:
    kbc, resets = make()
    command(kbc, 0xFE)
    assert resets.count == 1
    command(kbc, 0xFF)  # pulses nothing
    assert resets.count == 1


def test_write_output_port_with_bit0_clear_resets() -> None:
    kbc, resets = make()
    command(kbc, k.CMD_WRITE_OUTPUT_PORT)
    data_out(kbc, k.OUTPUT_RESET | k.OUTPUT_A20)
    assert resets.count == 0
    command(kbc, k.CMD_READ_OUTPUT_PORT)
    assert data_in(kbc) == k.OUTPUT_RESET | k.OUTPUT_A20
    command(kbc, k.CMD_WRITE_OUTPUT_PORT)
    data_out(kbc, k.OUTPUT_A20)
    assert resets.count == 1


def test_data_byte_without_a_command_goes_nowhere() -> None:
    kbc, resets = make()
    data_out(kbc, 0xFF)  # "reset" to an absent keyboard: no response, no CPU reset
    assert not status(kbc) & k.STATUS_OBF
    assert resets.count == 0


def test_command_port_write_cancels_pending_parameter() -> None:
    kbc, resets = make()
    command(kbc, k.CMD_WRITE_OUTPUT_PORT)
    command(kbc, k.CMD_KBD_ENABLE)
    data_out(kbc, 0x00)  # no longer the output port's parameter
    assert resets.count == 0


def test_reset_callback_may_reenter_the_device() -> None:
    kbc: I8042

    def callback() -> None:
        kbc.reset()

    kbc = I8042(callback)
    command(kbc, k.CMD_SELF_TEST)
    command(kbc, 0xFE)
    assert kbc.resets_requested == 1
    assert not status(kbc) & k.STATUS_OBF


def test_failing_reset_callback_is_contained() -> None:
    def callback() -> None:
        raise RuntimeError("boom")

    kbc = I8042(callback)
    command(kbc, 0xFE)
    assert kbc.resets_requested == 1


def test_responses_are_bounded() -> None:
    kbc, _ = make()
    for _ in range(100):
        command(kbc, k.CMD_SELF_TEST)
    assert kbc.dropped_responses == 100 - k.OUTPUT_QUEUE_LIMIT
    for _ in range(k.OUTPUT_QUEUE_LIMIT):
        assert data_in(kbc) == k.SELF_TEST_OK
    assert not status(kbc) & k.STATUS_OBF


def test_registered_on_a_bus_at_0x60_and_0x64() -> None:
    kbc, resets = make()
    bus = pio_bus()
    bus.register(k.I8042_DATA_PORT, 1, kbc.data_port, "i8042-data")
    bus.register(k.I8042_COMMAND_PORT, 1, kbc.command_port, "i8042-command")
    bus.write(0x64, b"\xaa")
    assert bus.read(0x64, 1)[0] & k.STATUS_OBF
    assert bus.read(0x60, 1) == b"\x55"
    bus.write(0x64, b"\xfe")
    assert resets.count == 1
    assert bus.stats.device_faults == 0


def test_wide_or_offset_accesses_are_ignored() -> None:
    kbc, resets = make()
    kbc.command_port.write(0, b"\xfe\x00")
    kbc.command_port.write(1, b"\xfe")
    assert resets.count == 0
    assert kbc.data_port.read(0, 2) == b"\xff\xff"
    assert kbc.data_port.read(3, 1) == b"\xff"


ops = st.tuples(
    st.sampled_from(["data", "command"]),
    st.booleans(),
    st.integers(-1, 3),
    st.sampled_from([1, 2, 4, 8]),
    st.binary(min_size=1, max_size=8),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, max_size=80))
def test_random_accesses_never_raise_and_stay_bounded(
    seq: list[tuple[str, bool, int, int, bytes]],
) -> None:
    kbc, _ = make()
    for port_name, is_read, offset, size, data in seq:
        port = kbc.data_port if port_name == "data" else kbc.command_port
        if is_read:
            assert len(port.read(offset, size)) == size
        else:
            port.write(offset, data)
        assert len(kbc._outq) <= k.OUTPUT_QUEUE_LIMIT
        assert len(kbc._ram) == k.RAM_SIZE
