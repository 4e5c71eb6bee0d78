"""Walk a run of entry lines and check the chain: the engine of `verify` and of recovery.

Checks, in order, for each line: it is a complete canonical entry; the log starts with its
genesis entry; seq follows by one; ``prev`` is the hash of the entry before; a checkpoint
names this log and key and its signature verifies. The walk stops at the first failure and
names the entry most likely at fault, looking one entry ahead to tell an altered entry from
an altered link:

- entry k altered: k+1 no longer links to k, but k+2 still links to k+1  -> k is bad;
- the ``prev`` of k altered: neither k-1 -> k nor k -> k+1 links        -> k is bad;
- entry inserted: it repeats a seq and the following entry skips it      -> it is bad;
- entry removed or moved: seq jumps or goes back                         -> where it does.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from isovisor.security.audit.entry import Entry, EntryType, decode
from isovisor.security.audit.errors import EntryFormatError
from isovisor.security.audit.keys import key_id, verify_signature
from isovisor.security.audit.segments import RawLine

_PRINTABLE = re.compile(rb"[\x20-\x7e]*")


@dataclass(frozen=True)
class Location:
    segment: str
    line: int
    seq: int | None = None

    def __str__(self) -> str:
        where = f"{self.segment} line {self.line}"
        return where if self.seq is None else f"seq {self.seq} ({where})"


@dataclass(frozen=True)
class Break:
    """The first bad entry and what is wrong with it."""

    location: Location
    message: str


@dataclass(frozen=True)
class Anchor:
    """An entry hash known from elsewhere (a syslog copy, an earlier verification)."""

    seq: int
    hash: str


@dataclass
class Seen:
    location: Location
    entry: Entry
    signed: bool = False  # a checkpoint whose signature verified


@dataclass
class ChainResult:
    entries: int = 0
    records: int = 0
    checkpoints: int = 0
    first: Seen | None = None
    last: Seen | None = None
    last_checkpoint: Seen | None = None
    log_id: str | None = None
    partial: RawLine | None = None  # bytes after the last newline of the last segment
    bad: Break | None = None
    anchors_matched: list[Anchor] = field(default_factory=list)


@dataclass
class _Item:
    raw: RawLine
    entry: Entry | None
    error: str | None


class _Lookahead:
    def __init__(self, lines: Iterable[RawLine]) -> None:
        self._it: Iterator[RawLine] = iter(lines)
        self._buf: deque[_Item] = deque()

    def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            raw = next(self._it, None)
            if raw is None:
                return False
            self._buf.append(_decode(raw))
        return True

    def next(self) -> _Item | None:
        return self._buf.popleft() if self._fill(1) else None

    def peek(self) -> _Item | None:
        return self._buf[0] if self._fill(1) else None


def _decode(raw: RawLine) -> _Item:
    if not raw.complete:
        return _Item(raw, None, "incomplete")
    try:
        return _Item(raw, decode(raw.data), None)
    except EntryFormatError as exc:
        return _Item(raw, None, str(exc))


def walk(lines: Iterable[RawLine], public: Ed25519PublicKey, *,
         after: Seen | None = None, log_id: str | None = None,
         anchors: Iterable[Anchor] = ()) -> ChainResult:
    """Check ``lines`` as the continuation of ``after`` (None: from the genesis entry)."""
    result = ChainResult(log_id=log_id)
    want = {a.seq: a for a in anchors}
    expected_key = key_id(public)
    prev = after
    items = _Lookahead(lines)
    while (item := items.next()) is not None:
        raw = item.raw
        if not raw.complete:
            where = Location(raw.segment.name, raw.number)
            if items.peek() is not None:
                result.bad = Break(where, "the line is cut short but more entries follow: the "
                                   "segment was truncated or bytes were removed")
            elif not torn_write_plausible(raw.data):
                result.bad = Break(where, "the last line is incomplete and holds bytes no torn "
                                   "write leaves (it was altered)")
            else:
                result.partial = raw
            return result
        if item.entry is None:
            result.bad = Break(Location(raw.segment.name, raw.number),
                               f"not a valid audit entry: {item.error}")
            return result
        e = item.entry
        here = Seen(Location(raw.segment.name, raw.number, e.seq), e)
        problem = _check(e, here, prev, items, result, expected_key, public)
        if problem is not None:
            result.bad = problem
            return result
        if raw.number == 1 and e.seq != raw.segment.first_seq:
            result.bad = Break(here.location,
                               f"segment {raw.segment.name} is named for seq "
                               f"{raw.segment.first_seq} but starts with seq {e.seq}: the "
                               "segment was renamed or its entries moved")
            return result
        anchor = want.get(e.seq)
        if anchor is not None:
            if anchor.hash != e.hash:
                result.bad = Break(here.location,
                                   f"does not match the anchor (sha256 {anchor.hash}): this "
                                   "entry, or the log before it, was rewritten")
                return result
            result.anchors_matched.append(anchor)
        result.entries += 1
        if e.type is EntryType.RECORD:
            result.records += 1
        elif e.type is EntryType.CHECKPOINT:
            result.checkpoints += 1
            result.last_checkpoint = here
        if result.first is None:
            result.first = here
        result.last = prev = here
    return result


def _check(e: Entry, here: Seen, prev: Seen | None, items: _Lookahead, result: ChainResult,
           expected_key: str, public: Ed25519PublicKey) -> Break | None:
    loc = here.location
    if prev is None:
        if e.type is not EntryType.GENESIS:
            return Break(loc, f"the log does not begin with its genesis entry (it begins with "
                         f"seq {e.seq}): its first entries or segments were removed")
        result.log_id = str(e.fields["log"])
        if e.fields["key"] != expected_key:
            return Break(loc, f"the log was created for audit key {e.fields['key']}, but the "
                         f"given key is {expected_key}: the wrong key was given, or the log "
                         "was re-created with another key")
        return None
    if e.type is EntryType.GENESIS:
        return Break(loc, "a second genesis entry: it was inserted")
    expected = prev.entry.seq + 1
    linked = e.prev == prev.entry.hash
    if e.seq > expected:
        if linked:
            return Break(loc, f"claims seq {e.seq} but is chained to seq {expected - 1}: its "
                         "seq was altered")
        return Break(loc, f"seq {e.seq} follows seq {expected - 1}: "
                     f"{_span(expected, e.seq - 1)} missing (removed) or out of order")
    if e.seq < expected:
        if e.prev == prev.entry.prev and _confirmed(e, items, public):
            return Break(prev.location, f"an inserted entry: seq {e.seq} appears twice and the "
                         "chain continues from the other one")
        return Break(loc, f"seq {e.seq} repeats or goes back after seq {expected - 1}: an "
                     "entry was inserted or entries were reordered")
    if not linked:
        return _localise_link(e, here, prev, items, public)
    if e.type is EntryType.CHECKPOINT:
        problem = _check_checkpoint(e, loc, result, expected_key, public)
        if problem is not None:
            return problem
        here.signed = True
    return None


def _confirmed(e: Entry, items: _Lookahead, public: Ed25519PublicKey) -> bool:
    """The next entry links to ``e``, or ``e`` is a checkpoint whose signature verifies."""
    nxt = items.peek()
    if nxt is not None and nxt.entry is not None and nxt.entry.prev == e.hash:
        return True
    return e.type is EntryType.CHECKPOINT and verify_signature(public, _signature(e),
                                                                e.signed_message())


def torn_write_plausible(tail: bytes) -> bool:
    """Could a crash mid-write have left ``tail`` (bytes after the last newline)?

    A torn write leaves a prefix of one canonical line, possibly followed by zeros (blocks
    allocated but never written): printable ASCII, and no complete JSON value followed by
    more bytes.
    """
    text = tail.rstrip(b"\0")
    if not _PRINTABLE.fullmatch(text):
        return False
    try:
        _, end = json.JSONDecoder().raw_decode(text.decode("ascii"))
    except ValueError:
        return True  # an unfinished value: what a cut line looks like
    return end == len(text)


def _localise_link(e: Entry, here: Seen, prev: Seen, items: _Lookahead,
                   public: Ed25519PublicKey) -> Break:
    what = f"does not chain to seq {prev.entry.seq} (its prev is not that entry's hash)"
    if prev.signed:
        return Break(here.location, f"{what}: it was altered (seq {prev.entry.seq} is a "
                     "checkpoint whose signature verifies)")
    if e.type is EntryType.CHECKPOINT:
        if not verify_signature(public, _signature(e), e.signed_message()):
            return Break(here.location, f"{what} and its signature does not verify: it was "
                         "altered")
        return Break(prev.location, f"was altered: checkpoint seq {e.seq}, whose signature "
                     "verifies, was made over a different version of it")
    nxt = items.peek()
    if nxt is not None and nxt.entry is not None:
        if nxt.entry.prev != e.hash:
            return Break(here.location, f"{what}, and seq {nxt.entry.seq} does not chain to it "
                         "either: it was altered")
        return Break(prev.location, f"was altered: seq {e.seq} was chained to a different "
                     "version of it")
    return Break(prev.location, f"was altered, or seq {e.seq} after it was: seq {e.seq} "
                 f"{what}")


def _check_checkpoint(e: Entry, loc: Location, result: ChainResult, expected_key: str,
                      public: Ed25519PublicKey) -> Break | None:
    if result.log_id is not None and e.fields["log"] != result.log_id:
        return Break(loc, f"checkpoint names log {e.fields['log']}, not this log "
                     f"({result.log_id}): it was copied from another log")
    if e.fields["key"] != expected_key:
        return Break(loc, f"checkpoint was made with key {e.fields['key']}, not the given key "
                     f"{expected_key}: it was forged, or the wrong key was given")
    if not verify_signature(public, _signature(e), e.signed_message()):
        return Break(loc, "checkpoint signature does not verify: the checkpoint was altered or "
                     "forged, or the entries since the previous checkpoint were rewritten")
    return None


def _signature(e: Entry) -> bytes:
    return e.signature()


def _span(first: int, last: int) -> str:
    return f"seq {first} is" if first == last else f"seqs {first}..{last} are"
