"""virtio-rng request handling over fuzzed rings (entropy from a counter: replayable)."""

from __future__ import annotations

from fuzz import rig
from fuzz.data import Data
from isovisor.devices.virtio.rng import VirtioRng

COVERS = ("virtio:virtio-rng",)


def one_input(data: bytes) -> None:
    dev = VirtioRng(rig.security_events(), max_request=4096, entropy=lambda n: bytes(n))
    rig.drive(dev, Data(data))
    assert dev.rng_stats.bytes <= dev.rng_stats.requests * 4096
