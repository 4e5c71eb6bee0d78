"""Verify a whole log directory and say plainly what is proven and what is not."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from isovisor.security.audit.chain import Anchor, Break, ChainResult, Location, walk
from isovisor.security.audit.entry import EntryType
from isovisor.security.audit.keys import key_id
from isovisor.security.audit.segments import (
    RawLine,
    Segment,
    iter_lines,
    list_segments,
    log_segments,
)


class Status(StrEnum):
    VERIFIED = "verified"  # every entry chained and covered by a checkpoint signature
    UNPROVEN = "unproven"  # nothing wrong found, but the end of the log is not signed
    TAMPERED = "tampered"  # an entry is altered, missing, inserted, reordered or cut


@dataclass
class VerifyReport:
    directory: Path
    key_id: str
    key_source: str
    status: Status
    chain: ChainResult
    segments: int
    bad: Break | None
    unproven: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def first_bad(self) -> Location | None:
        return self.bad.location if self.bad else None

    def lines(self) -> list[str]:
        """The human report, most important line first."""
        c = self.chain
        out = [f"audit log {self.directory}: {self.status.value.upper()}"]
        if self.bad is not None:
            out.append(f"first bad entry: {self.bad.location}: {self.bad.message}")
            if c.last is not None:
                out.append(f"entries before it verify: seq 0..{c.last.entry.seq}")
        else:
            out.append(f"{c.entries} entries ({c.records} records, {c.checkpoints} checkpoints) "
                       f"in {self.segments} segment(s)")
            if c.last is not None:
                out.append(f"head: seq {c.last.entry.seq} sha256 {c.last.entry.hash}")
            if c.last_checkpoint is not None:
                cp = c.last_checkpoint.entry
                out.append(f"last checkpoint: seq {cp.seq} at {cp.ts} "
                           f"(reason {cp.fields['reason']}) sha256 {cp.hash}")
        out.append(f"key: {self.key_id} ({self.key_source})")
        if self.unproven:
            out.append("cannot be proven:")
            out.extend(f"  - {u}" for u in self.unproven)
        if self.notes:
            out.append("notes:")
            out.extend(f"  - {n}" for n in self.notes)
        return out


def _all_lines(segments: list[Segment]) -> Iterator[RawLine]:
    for seg in segments:
        yield from iter_lines(seg)


def verify_log(directory: Path, public: Ed25519PublicKey, *, key_source: str = "given",
               key_from_log_dir: bool = False, anchors: Iterable[Anchor] = ()) -> VerifyReport:
    segments = log_segments(directory)
    strays = list_segments(directory)[1] if directory.is_dir() else []
    wanted = list(anchors)
    chain = walk(_all_lines(segments), public, anchors=wanted)
    report = VerifyReport(directory, key_id(public), key_source, Status.VERIFIED, chain,
                          len(segments), chain.bad)
    notes = report.notes
    notes.extend(f"{name} is not a segment name and was not read" for name in strays)
    for seg in segments[:-1]:
        if seg.path.stat().st_size == 0:
            notes.append(f"{seg.name} is empty but is not the last segment")
    if chain.bad is None:
        for a in wanted:
            if a not in chain.anchors_matched:
                last = chain.last.entry.seq if chain.last else -1
                report.bad = Break(Location(segments[-1].name, 0, a.seq),
                                   f"the anchor's entry is missing: the log ends at seq {last}, "
                                   "so its end was removed")
                break
    if report.bad is not None:
        report.status = Status.TAMPERED
    _state_unproven(report, key_from_log_dir, bool(wanted))
    return report


def _state_unproven(report: VerifyReport, key_from_log_dir: bool, anchored: bool) -> None:
    c = report.chain
    u = report.unproven
    if report.status is Status.TAMPERED:
        u.append("nothing after the first bad entry was checked")
    else:
        cp = c.last_checkpoint
        last = c.last
        if cp is None or last is None:
            u.append("no checkpoint: no entry is signed, so any of them could have been "
                     "rewritten")
            report.status = Status.UNPROVEN
        elif last.entry.seq > cp.entry.seq:
            u.append(f"{last.entry.seq - cp.entry.seq} entries after the last checkpoint "
                     f"(seq {cp.entry.seq + 1}..{last.entry.seq}) are chained but not signed: "
                     "they could have been altered or removed without trace")
            report.status = Status.UNPROVEN
        if c.partial is not None:
            u.append(f"{c.partial.segment.name} ends in an incomplete entry "
                     f"({len(c.partial.data)} bytes at line {c.partial.number}): a crash during "
                     "a write, or a truncation; its content cannot be recovered")
            report.status = Status.UNPROVEN
        if cp is not None:
            reason = cp.entry.fields["reason"]
            if anchored:
                u.append(f"entries after seq {max(a.seq for a in c.anchors_matched)} (the last "
                         "anchor) could have been removed at their end without trace")
            else:
                u.append(f"whether entries after the last checkpoint (seq {cp.entry.seq}, "
                         f"{cp.entry.ts}) were removed, whole segments included: compare the "
                         "head with an off-host copy (syslog) or pass --anchor SEQ:SHA256")
            if reason != "close" and last is not None and last.entry.type is EntryType.CHECKPOINT:
                report.notes.append(f"the last checkpoint was made for reason {reason!r}, not "
                                    "'close': the daemon is running or stopped uncleanly, or the "
                                    "end of the log was removed")
            elif reason != "close" or (last is not None and
                                       last.entry.type is not EntryType.CHECKPOINT):
                report.notes.append("the log does not end with a closing checkpoint: the daemon "
                                    "is running or stopped uncleanly, or the end was removed")
    if key_from_log_dir:
        u.append("the public key was read from the log directory: whoever can rewrite the log "
                 "can replace it too; verify with --key and a copy kept off the host")
