"""The daemon's reader of a VMM's security events channel (RUN_DIR/events.jsonl): every
byte is written by the VMM side. Oracle: the reader and the watcher never raise; a read
returns at most what fits READ_CHUNK; every event returned is valid (re-encodes within
MAX_LINE_BYTES); records stay within the rate limit; the offset only moves forward
within the file."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fuzz.data import Data
from isovisor.security.audit import event_channel as ec
from isovisor.security.audit.vm_events import VmChannel, VmEventWatcher

COVERS = ("host:runtime/vmm-security-events",)
_state: dict[str, Any] = {}


class _Sink:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def append(self, kind: str, data: dict[str, Any], *, durable: bool = True) -> Any:
        self.records.append((kind, data))


def one_input(data: bytes) -> None:
    if not _state:
        _state["tmp"] = tempfile.TemporaryDirectory(prefix="isovisor-fuzz-events-")
    d = Data(data)
    root = Path(_state["tmp"].name)
    path = root / "events.jsonl"
    for leftover in root.iterdir():
        leftover.unlink()
    path.write_bytes(d.blob(3 * ec.MAX_LINE_BYTES))
    reader = ec.ChannelReader(path)
    size = path.stat().st_size
    items = reader.read(final=d.u8() & 1 == 1)
    assert 0 <= reader.offset <= size
    for item in items:
        if isinstance(item, ec.ChannelEvent):
            line = ec.encode_line(item.kind, item.source, item.detail, item.time)
            assert len(line) <= ec.MAX_LINE_BYTES
        elif isinstance(item, ec.MalformedLine):
            assert len(item.sha256) == 64 and item.prefix.isascii()
    with open(path, "ab") as f:  # more appended later, maybe finishing a torn line
        f.write(d.rest()[: 2 * ec.MAX_LINE_BYTES])
    before = reader.offset
    reader.read(final=True)
    assert reader.offset >= before
    clock = [0.0]
    sink = _Sink()
    watcher = VmEventWatcher(sink, lambda: [VmChannel("id", "t", "v", path)],
                             rate=2.0, clock=lambda: clock[0])
    watcher.poll()
    watcher.poll()  # the VM is still listed: nothing new, nothing repeated
    assert len(sink.records) <= 4  # burst of twice the rate, the clock never moves
    assert all(k.startswith("security.") for k, _ in sink.records)
    assert watcher.failures == 0
