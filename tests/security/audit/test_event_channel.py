"""The security events channel under attack: the daemon's reader and watcher against a
hostile writer (malformed, overlong, torn and flooding lines, a FIFO, a symlink), and the
writer's own bounds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from isovisor.devices.events import SecurityEventLog
from isovisor.security.audit import event_channel as ec
from isovisor.security.audit.vm_events import OFFSET_FILE, VmChannel, VmEventWatcher


class Sink:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def append(self, kind: str, data: dict[str, Any], *, durable: bool = True) -> Any:
        self.records.append((kind, data))


GOOD = ec.encode_line("virtio-needs-reset", "virtio-rng@0xd0000000", "a loop", 1.7e9)


def _watch(path: Path, sink: Sink, clock: list[float], rate: float = 20.0) -> VmEventWatcher:
    return VmEventWatcher(sink, lambda: [VmChannel("vm-id", "acme", "web", path)],
                          rate=rate, clock=lambda: clock[0])


def test_events_and_malformed_lines_are_recorded_with_the_vm(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(GOOD + b"not json\n" + b'{"v":1,"kind":"x"}\n'
                     + b"z" * (ec.MAX_LINE_BYTES + 100) + b"\n" + GOOD + GOOD[:30])
    sink = Sink()
    _watch(path, sink, [0.0]).poll()
    kinds = [k for k, _ in sink.records]
    assert kinds == ["security.virtio-needs-reset", "security.malformed-event",
                     "security.malformed-event", "security.malformed-event",
                     "security.virtio-needs-reset"]  # the torn last line waits
    first = sink.records[0][1]
    assert first["scope"] == "/tenants/acme/vms/web" and first["vm_id"] == "vm-id"
    assert first["tenant"] == "acme" and first["source"] == "vmm: virtio-rng@0xd0000000"
    assert "not JSON" in sink.records[1][1]["detail"]
    assert "keys are not exactly" in sink.records[2][1]["detail"]
    overlong = sink.records[3][1]
    assert "longer than" in overlong["detail"] and len(overlong["detail"]) < 600
    assert overlong["channel_offset"] == len(GOOD) + 9 + 19


def test_a_torn_last_line_is_malformed_once_the_vm_is_gone(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(GOOD + GOOD[:30])
    sink, vms = Sink(), [VmChannel("vm-id", "acme", "web", path)]
    watcher = VmEventWatcher(sink, lambda: list(vms))
    watcher.poll()
    assert len(sink.records) == 1
    vms.clear()  # the VM stopped: its channel is read a last time, to its end
    watcher.poll()
    assert [k for k, _ in sink.records] == ["security.virtio-needs-reset",
                                            "security.malformed-event"]
    assert "incomplete" in sink.records[1][1]["detail"]


def test_a_restarted_watcher_neither_repeats_nor_loses_events(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(GOOD * 2)
    first = Sink()
    _watch(path, first, [0.0]).poll()
    assert (tmp_path / OFFSET_FILE).exists()
    with open(path, "ab") as f:
        f.write(GOOD)
    again = Sink()
    _watch(path, again, [0.0]).poll()  # a new daemon: reads on from the saved offset
    assert len(first.records) == 2 and len(again.records) == 1
    os.unlink(path)  # the VM was started again: a new channel is read from its start
    path.write_bytes(GOOD)
    third = Sink()
    _watch(path, third, [0.0]).poll()
    assert len(third.records) == 1


def test_a_flood_is_rate_limited_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(GOOD * 20000 + b"garbage\n" * 5000)
    sink, clock = Sink(), [0.0]
    watcher = _watch(path, sink, clock, rate=10.0)
    for _ in range(3):
        watcher.drain(VmChannel("vm-id", "acme", "web", path), final=False)
    assert len(sink.records) == 20  # the burst; the clock has not moved
    clock[0] = 1.0
    watcher.poll()
    assert len(sink.records) == 30  # ten more a second later
    assert "were not recorded: rate limit" in sink.records[20][1]["detail"]
    assert path.stat().st_size > 10 * ec.READ_CHUNK  # and it is still reading, bounded


def test_a_channel_past_its_limit_is_recorded_once_and_no_longer_read(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with open(path, "wb") as f:
        f.truncate(ec.MAX_CHANNEL_BYTES + 10)  # sparse: 16 MiB of zeros, then nothing
    reader = ec.ChannelReader(path, offset=ec.MAX_CHANNEL_BYTES, inode=path.stat().st_ino)
    assert [type(i) for i in reader.read()] == [ec.ChannelOverflow]
    assert reader.read() == [] and reader.read(final=True) == []


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_channel_that_is_not_a_file_neither_blocks_nor_crashes(tmp_path: Path,
                                                                 kind: str) -> None:
    path = tmp_path / "events.jsonl"
    if kind == "fifo":
        os.mkfifo(path)  # an open for reading would block without O_NONBLOCK
    elif kind == "symlink":
        (tmp_path / "secret").write_bytes(GOOD)
        path.symlink_to(tmp_path / "secret")
    else:
        path.mkdir()
    sink = Sink()
    watcher = _watch(path, sink, [0.0])
    watcher.poll()
    assert all(k == "security.event-channel-overflow" for k, _ in sink.records)
    assert not any(k == "security.virtio-needs-reset" for k, _ in sink.records)


@pytest.mark.parametrize("line", [
    b'{"detail":"d","kind":"k","source":"s","time":NaN,"v":1}',
    b'{"detail":"d","kind":"K!","source":"s","time":1,"v":1}',
    b'{"detail":"d","kind":"k","source":"s","time":1,"v":true}',
    b'{"detail":"d","kind":"k","source":"s","time":1,"v":1,"x":0}',
    b'{"detail":"' + b"d" * 3000 + b'","kind":"k","source":"s","time":1,"v":1}',
    b"[" * 5000,
    b'{"detail":"\xff","kind":"k","source":"s","time":1,"v":1}',
])
def test_invalid_lines_are_refused(line: bytes) -> None:
    with pytest.raises(ec.EventLineError):
        ec.parse_event_line(line)


def test_the_writer_is_rate_limited_capped_and_escapes(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    clock = [0.0]
    writer = ec.ChannelWriter(path, rate=5.0, clock=lambda: clock[0])
    events = SecurityEventLog()
    events.listeners.append(writer)
    for i in range(50):
        events.report("virtio-needs-reset", "dev\n", f"\u2028{'x' * 5000} {i}")
    clock[0] = 1.0
    events.report("virtio-needs-reset", "dev", "after a second")
    writer.close()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 11 and writer.dropped == 40  # a burst of twice the rate, then 1
    for line in lines:
        ev = ec.parse_event_line(line)  # what the writer writes, the reader accepts
        assert ev.kind == "virtio-needs-reset" and len(line) < ec.MAX_LINE_BYTES
    assert "40 earlier events were not written" in ec.parse_event_line(lines[-1]).detail


def test_the_writer_stops_at_its_size_cap(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writer = ec.ChannelWriter(path, rate=1e9, max_bytes=8 * ec.MAX_LINE_BYTES)
    for i in range(1000):
        writer.write("seccomp-kill", "worker", "y" * 1000 + str(i), 1.0)
    writer.close()
    assert path.stat().st_size <= 8 * ec.MAX_LINE_BYTES and writer.dropped > 900


def test_a_fifo_or_link_in_place_of_the_offset_file_neither_blocks_nor_misleads(
        tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(GOOD)
    os.mkfifo(tmp_path / OFFSET_FILE)  # a read would block forever without O_NONBLOCK
    sink = Sink()
    _watch(path, sink, [0.0]).poll()  # reads from the start
    assert len(sink.records) == 1
    os.unlink(tmp_path / OFFSET_FILE)
    (tmp_path / "elsewhere").write_text("precious")
    (tmp_path / (OFFSET_FILE + ".tmp")).symlink_to(tmp_path / "elsewhere")
    with open(path, "ab") as f:
        f.write(GOOD)
    _watch(path, Sink(), [0.0]).poll()
    assert (tmp_path / "elsewhere").read_text() == "precious"  # the link was not followed
