"""CMOS RTC: index and data ports (CMOS bytes, clock registers)."""

from __future__ import annotations

import datetime

from fuzz import traffic
from fuzz.data import Data
from isovisor.devices.legacy.rtc import CmosRtc

COVERS = ("pio:cmos-rtc",)
NOW = datetime.datetime(2024, 2, 29, 23, 59, 58, tzinfo=datetime.UTC)  # deterministic


def one_input(data: bytes) -> None:
    d = Data(data)
    rtc = CmosRtc(memory_size=(1 + d.u8()) << 24, clock=lambda: NOW)
    traffic.run(d, [(rtc, 2)])
