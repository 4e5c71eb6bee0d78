"""Entry encoding: one canonical byte string per entry, strict decoding."""

from __future__ import annotations

import pytest

from isovisor.security.audit.entry import (
    GENESIS_PREV,
    MAX_DEPTH,
    canonical,
    check_depth,
    decode,
    encode,
    record_line,
    timestamp,
    timestamp_ns,
)
from isovisor.security.audit.errors import AuditRecordError, EntryFormatError


def record(**over: object) -> dict[str, object]:
    fields: dict[str, object] = {"v": 1, "type": "record", "seq": 5, "ts": timestamp(0.5),
                                 "prev": GENESIS_PREV, "kind": "api.request",
                                 "data": {"who": "ålice", "n": 1.5, "ok": None}}
    fields.update(over)
    return fields


def test_round_trip_is_exact() -> None:
    e = encode(record())
    assert decode(e.line).line == e.line
    assert decode(e.line).hash == e.hash
    assert b" " not in e.line and e.line.isascii()
    assert timestamp(0.5) == "1970-01-01T00:00:00.500000Z"


@pytest.mark.parametrize("mangle", [
    lambda b: b.replace(b'"seq":5', b'"seq": 5'),  # whitespace
    lambda b: b.replace(b"\\u00e5", b"\\u00E5"),  # other escape spelling
    lambda b: b.replace(b'"seq":5', b'"seq":5.0'),  # another number spelling
    lambda b: b'{"v":1,' + b[1:].replace(b',"v":1', b""),  # key order
])
def test_non_canonical_spellings_are_refused(mangle: object) -> None:
    line = encode(record()).line
    bad = mangle(line)  # type: ignore[operator]
    assert bad != line
    with pytest.raises(EntryFormatError):
        decode(bad)


@pytest.mark.parametrize("line, why", [
    (b'{"a":1,"a":2}', "duplicate"),
    (b"[1]", "not a JSON object"),
    (b"\xff", "not ASCII"),
    (b'{"v":1', "not JSON"),
    (canonical(record(extra=1)), "fields wrong"),
    (canonical(record(v=2)), "format version"),
    (canonical(record(v=True)), "format version"),
    (canonical(record(seq=-1)), "seq"),
    (canonical(record(ts="yesterday")), "timestamp"),
    (canonical(record(ts="2026-02-30T00:00:00.000000Z")), "not a date"),
    (canonical(record(prev="00")), "prev"),
    (canonical(record(kind="Not A Kind")), "kind"),
    (canonical(record(data=[1])), "data"),
    (canonical(record(type="other")), "unknown entry type"),
    (b'{"v":NaN}', "non-finite"),
    (b"[" * 100_000, "exceeds"),
])
def test_malformed_lines_are_refused(line: bytes, why: str) -> None:
    with pytest.raises(EntryFormatError, match=why):
        decode(line)


def test_writer_side_errors_are_record_errors() -> None:
    with pytest.raises(AuditRecordError):
        encode(record(kind="BAD"))
    with pytest.raises(AuditRecordError):
        encode(record(data={"x": object()}))


@pytest.mark.parametrize("data", [
    {},
    {"who": "ålice", "n": 1.5, "ok": None, "big": 10**30, "neg": -0.0, "t": True},
    {"z": 1, "a": {"y": [1, {"b": "\x00\n\"\\\u2028"}], "x": []}, "m": "😀"},
    {"status": 200, "path": "/v1/tenants/a b", "principal": "CN=x,O=\"y\""},
])
def test_the_writers_record_line_is_the_canonical_encoding(data: dict[str, object]) -> None:
    """The writer assembles a record's line around canonical(data) (record_line); it must
    be exactly canonical() of the whole entry, or verify would refuse the log."""
    ts = timestamp_ns(1_700_000_000_123_456_789)
    fields = record(data=data, seq=123456789, prev="ab" * 32, ts=ts)
    line = record_line(123456789, ts, "ab" * 32, "api.request", canonical(data).decode())
    assert line == canonical(fields)
    assert decode(line).fields == fields


def test_timestamp_ns_matches_timestamp() -> None:
    for ns in (0, 500_000_000, 1_700_000_000_123_456_000, 1_700_000_001_999_999_999,
               1_700_000_000_000_000_000):
        assert timestamp_ns(ns) == timestamp((ns // 1000) / 1e6), ns
    assert timestamp_ns(1_700_000_000_999_999_999).endswith(":20.999999Z")  # cut, not rounded


@pytest.mark.parametrize("depth", [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1])
def test_check_depth_bound(depth: int) -> None:
    """Data whose deepest value is at depth MAX_DEPTH is accepted, one deeper is refused,
    whether that value is a scalar, an empty container or a list."""
    for leaf in (1, {}, []):
        value: object = leaf
        for _ in range(depth):
            value = {"k": value}
        if depth <= MAX_DEPTH:
            check_depth(value)
        else:
            with pytest.raises(AuditRecordError, match="nested deeper"):
                check_depth(value)
    value = [1]
    for _ in range(depth - 1):
        value = [value]
    if depth <= MAX_DEPTH:
        check_depth(value)
    else:
        with pytest.raises(AuditRecordError, match="nested deeper"):
            check_depth(value)
