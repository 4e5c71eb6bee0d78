"""Reading a log for people and other tools: JSON-lines export and one-line summaries.

An unfiltered export is the log's lines, byte for byte, in order: a single file that
`isovisor audit verify --file` checks exactly as it checks the directory. Reading never
writes to the log and needs only read access.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from isovisor.security.audit.chain import Location
from isovisor.security.audit.entry import Entry, EntryType, decode, parse_timestamp
from isovisor.security.audit.errors import EntryFormatError
from isovisor.security.audit.segments import iter_lines, list_segments, log_segments


@dataclass
class ReadStats:
    entries: int = 0
    damaged: int = 0  # complete lines that are not entries (verify says why)
    partial: int = 0  # an incomplete last line


def read_entries(path: Path, stats: ReadStats | None = None) -> Iterator[tuple[Location, Entry]]:
    """Decodable entries in log order; damaged lines are counted in ``stats`` and skipped."""
    stats = stats if stats is not None else ReadStats()
    for seg in log_segments(path):
        for raw in iter_lines(seg):
            if not raw.complete:
                stats.partial += 1
                continue
            try:
                entry = decode(raw.data)
            except EntryFormatError:
                stats.damaged += 1
                continue
            stats.entries += 1
            yield Location(seg.name, raw.number, entry.seq), entry


def matches(entry: Entry, kind: str | None, since: datetime | None) -> bool:
    if kind is not None and not (entry.kind == kind or entry.kind.startswith(kind + ".")
                                 or (kind.endswith(".") and entry.kind.startswith(kind))):
        return False
    return since is None or parse_timestamp(entry.ts) >= since


def export(path: Path, out: IO[bytes], *, kind: str | None = None,
           since: datetime | None = None) -> ReadStats:
    """Write entries as JSON lines; without filters, the complete log byte for byte."""
    stats = ReadStats()
    for seg in log_segments(path):
        for raw in iter_lines(seg):
            if not raw.complete:
                stats.partial += 1
                continue
            if kind is None and since is None:
                out.write(raw.data + b"\n")
                stats.entries += 1
                continue
            try:
                entry = decode(raw.data)
            except EntryFormatError:
                stats.damaged += 1
                continue
            if matches(entry, kind, since):
                out.write(raw.data + b"\n")
                stats.entries += 1
    return stats


def summary(entry: Entry) -> str:
    """One line saying what an entry records."""
    f = entry.fields
    if entry.type is EntryType.GENESIS:
        return f"log {f['log']} created for key {f['key']}"
    if entry.type is EntryType.CHECKPOINT:
        return f"checkpoint ({f['reason']}), signed by key {f['key']}"
    d: dict[str, Any] = f["data"]
    if entry.kind == "api.request":
        status = f" {d['status']}" if d.get("status") is not None else ""
        return (f"{d.get('principal') or '-'} {d.get('action')} {d.get('scope')} -> "
                f"{d.get('outcome')}{status} from {d.get('client')} [{d.get('request_id')}]")
    if entry.kind == "vm.lifecycle":
        return f"{d.get('scope') or d.get('vm')}: {d.get('from')} -> {d.get('to')}" + (
            f" ({d['reason']})" if d.get("reason") else "")
    if entry.kind.startswith("security."):
        where = d.get("scope") or d.get("vm") or ""
        return f"{d.get('source')}{' ' + where if where else ''}: {d.get('detail')}"
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


def read_page(directory: Path, after_seq: int, limit: int,
              kind: str | None = None) -> tuple[list[Entry], int | None]:
    """Up to ``limit`` entries with seq > ``after_seq`` (records of ``kind`` only, if
    given), and the seq to continue after, or None at the end. Segments wholly before
    ``after_seq`` are skipped unread. A missing directory is an empty log."""
    if not directory.is_dir():
        return [], None
    segments = list_segments(directory)[0]
    start = 0
    for i, seg in enumerate(segments):
        if seg.first_seq <= after_seq + 1:
            start = i
    out: list[Entry] = []
    for seg in segments[start:]:
        for raw in iter_lines(seg):
            if not raw.complete:
                continue
            try:
                entry = decode(raw.data)
            except EntryFormatError:
                continue
            if entry.seq <= after_seq or not matches(entry, kind, None):
                continue
            if kind is not None and entry.type is not EntryType.RECORD:
                continue
            if len(out) == limit:
                return out, out[-1].seq
            out.append(entry)
    return out, None
