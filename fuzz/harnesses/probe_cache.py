"""The emulator-probe cache the VMM reads at start (PVM hosts): a JSON file in a runtime
directory. A forged file must never enable an assist or hide a feature that is not one
of the known names; anything malformed means "probe again"."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fuzz.data import Data
from isovisor.vmm import emulator_probe as ep
from isovisor.vmm.assists import ASSISTS
from isovisor.vmm.cpu_features import FEATURES

COVERS = ("host:runtime/emulator-probe-cache",)
KEY = {"boot_id": "fuzz", "kernel": "6.1", "isovisor": "0"}
_state: dict[str, Any] = {}


def one_input(data: bytes) -> None:
    if not _state:
        _state["tmp"] = tempfile.TemporaryDirectory(prefix="isovisor-fuzz-probe-")
    d = Data(data)
    raw = d.rest()
    text = raw.decode("utf-8", "replace")
    if data[:1] == b"{":
        text = raw.decode("utf-8", "replace")
    path = Path(_state["tmp"].name) / ep.CACHE_NAME
    path.write_bytes(raw)
    read = ep._read_cache(path)
    assert read is None or len(read.encode()) <= ep._MAX_CACHE_BYTES
    for candidate in (text, read):
        if candidate is None:
            continue
        result = ep._from_json(candidate, KEY)
        if result is not None:
            assert result.unemulable <= FEATURES.keys()
            assert result.needs_assists <= ASSISTS
            assert result.elapsed_s >= 0
