"""i8042 keyboard controller: data and command ports (the reset line included)."""

from __future__ import annotations

from fuzz import traffic
from fuzz.data import Data
from isovisor.devices.legacy.i8042 import I8042

COVERS = ("pio:i8042-data", "pio:i8042-command")


def one_input(data: bytes) -> None:
    resets: list[int] = []
    dev = I8042(reset_callback=lambda: resets.append(1))
    traffic.run(Data(data), [(dev.data_port, 1), (dev.command_port, 1)])
