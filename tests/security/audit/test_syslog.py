"""Forwarding to syslog: durable entries leave the host as RFC 5424 datagrams."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from isovisor.security.audit import AuditConfig, AuditConfigError, AuditLog, AuditSigningKey
from isovisor.security.audit.syslog import SyslogForwarder, parse_address


def _receive(sock: socket.socket, n: int) -> list[bytes]:
    sock.settimeout(5)
    return [sock.recv(70_000) for _ in range(n)]


@pytest.mark.parametrize("checkpoints_only", [False, True])
def test_forwarded_entries_are_the_log_lines(tmp_path: Path, key: AuditSigningKey,
                                             checkpoints_only: bool) -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    fwd = SyslogForwarder(f"udp:127.0.0.1:{port}", checkpoints_only=checkpoints_only)
    with AuditLog(AuditConfig(tmp_path / "a"), key, forwarder=fwd) as log:
        log.append("t.rec", {"hello": "world"})
    fwd.close()
    lines = (tmp_path / "a" / "audit-000000000000.log").read_bytes().splitlines()
    wanted = [ln for ln in lines if not checkpoints_only or b'"type":"record"' not in ln]
    got = _receive(server, len(wanted))
    server.close()
    for message, line in zip(got, wanted, strict=True):
        assert message.startswith(b"<8")  # authpriv: facility 10 * 8 + severity
        assert b" isovisord - audit - " in message
        assert message.endswith(line)
    assert fwd.sent == len(wanted) and fwd.dropped == 0


def test_addresses() -> None:
    assert parse_address("unix:/dev/log") == (socket.AF_UNIX, "/dev/log")
    assert parse_address("udp:[::1]:514") == (socket.AF_INET6, ("::1", 514))
    for bad in ("tcp:x:1", "udp:host", "udp:host:99999", "unix:"):
        with pytest.raises(AuditConfigError):
            parse_address(bad)


def test_an_absent_receiver_never_blocks_the_log(tmp_path: Path, key: AuditSigningKey) -> None:
    fwd = SyslogForwarder(f"unix:{tmp_path / 'nobody-listens'}")
    with AuditLog(AuditConfig(tmp_path / "a"), key, forwarder=fwd) as log:
        log.append("t.rec", {})
    fwd.close()
    assert fwd.errors > 0 and fwd.sent == 0
