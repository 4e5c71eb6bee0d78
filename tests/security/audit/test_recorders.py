"""What is recorded: requests, VM transitions, security events (with a rate limit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from isovisor.devices.events import SecurityEventLog
from isovisor.security.audit import AuditConfig, AuditError, AuditLog, AuditSigningKey, Receipt
from isovisor.security.audit.export import read_entries, summary
from isovisor.security.audit.recorders import (
    MAX_FIELD_CHARS,
    RequestAudit,
    SecurityEventBridge,
    record_request,
    record_security_event,
    record_vm_transition,
    security_kind,
)


class FakeSink:
    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any], bool]] = []

    def append(self, kind: str, data: dict[str, Any], *, durable: bool = True) -> Receipt:
        self.got.append((kind, data, durable))
        return Receipt(len(self.got), "0" * 64, "seg", durable)


def test_request_record() -> None:
    sink = FakeSink()
    record_request(sink, RequestAudit(
        principal="CN=alice,O=acme", action="vms/write", scope="/tenants/acme/vms/web",
        outcome="denied", request_id="r-1", client="10.0.0.5:4431", time=0.0, status=403,
        method="POST", path="/v1/tenants/acme/vms"))
    kind, data, durable = sink.got[0]
    assert kind == "api.request" and durable
    assert data["outcome"] == "denied" and data["time"] == "1970-01-01T00:00:00.000000Z"
    with pytest.raises(AuditError, match="outcome"):
        record_request(sink, RequestAudit(None, "a", "/", "maybe", "r", "c", 0.0))


def test_hostile_strings_are_clipped() -> None:
    sink = FakeSink()
    record_security_event(sink, kind="virtio-needs-reset", source="virtio-blk",
                          detail="A" * 100_000)
    detail = sink.got[0][1]["detail"]
    assert len(detail) < MAX_FIELD_CHARS + 100 and detail.endswith("more characters]")


def test_security_kinds_are_made_safe() -> None:
    assert security_kind("seccomp-kill") == "security.seccomp-kill"
    assert security_kind("Weird Kind!\n") == "security.weird-kind"
    assert security_kind("9lives") == "security.x9lives"
    assert security_kind("") == "security.unknown"


def test_vm_transition_and_summaries(tmp_path: Path, key: AuditSigningKey) -> None:
    with AuditLog(AuditConfig(tmp_path / "a"), key) as log:
        record_vm_transition(log, scope="/tenants/t/vms/v", old="stopped", new="running",
                             reason="start requested")
        record_request(log, RequestAudit("alice", "vms/read", "/tenants/t", "allowed", "r-9",
                                         "127.0.0.1:1", 0.0, status=200))
    lines = [summary(e) for _, e in read_entries(tmp_path / "a") if e.kind != "audit.opened"]
    assert "/tenants/t/vms/v: stopped -> running (start requested)" in lines
    assert "alice vms/read /tenants/t -> allowed 200 from 127.0.0.1:1 [r-9]" in lines


def test_bridge_feeds_vm_security_events_with_a_rate_limit() -> None:
    sink = FakeSink()
    now = [0.0]
    bridge = SecurityEventBridge(sink, "/tenants/t/vms/v", rate=2.0, clock=lambda: now[0])
    events = SecurityEventLog()
    bridge.attach(events)
    for _ in range(10):  # a flood at one instant: the burst (2 x rate) gets through
        events.report("virtio-needs-reset", "virtio-net", "bad descriptor")
    assert len(sink.got) == 4
    assert all(kind == "security.virtio-needs-reset" and not durable
               for kind, _, durable in sink.got)
    now[0] = 1.0
    events.report("seccomp-kill", "worker", "syscall 59")
    assert "6 earlier events" in sink.got[-1][1]["detail"]
    bridge.detach(events)
    events.report("seccomp-kill", "worker", "after detach")
    assert len(sink.got) == 5


def test_bridge_never_raises_into_the_device(tmp_path: Path, key: AuditSigningKey) -> None:
    log = AuditLog(AuditConfig(tmp_path / "a"), key)
    log.close()
    bridge = SecurityEventBridge(log, "/tenants/t/vms/v")
    events = SecurityEventLog()
    bridge.attach(events)
    events.report("virtio-needs-reset", "virtio-blk", "x")  # the log is closed: counted
    assert bridge.failures == 1
