"""Audit entries: one canonical JSON object per line, chained by SHA-256.

Three entry types share the chain:

- ``genesis`` (seq 0): the log id and the public audit key;
- ``record``: one audited fact (``kind`` + ``data``);
- ``checkpoint``: an Ed25519 signature over itself (all fields but ``sig``), which includes
  ``prev``, the hash of the entry before it, and so covers the whole chain up to it.

An entry's hash is the SHA-256 of its exact line bytes (without the newline). Lines must be
canonical (sorted keys, no spaces, ASCII): re-encoding a parsed line must give the same
bytes, so no two byte strings mean the same entry and every byte is covered by the chain.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from isovisor.security.audit.errors import AuditRecordError, EntryFormatError


def _line_sha256() -> Callable[[bytes], Any]:
    """CPython's own SHA-256 (the module hashlib falls back to without OpenSSL): the same
    digest, and for one short line, as the writer hashes per entry, less than half the
    time of OpenSSL's, whose per-call setup dominates for a few hundred bytes (measured on
    an API request's path: docs/AUDIT.md "Cost")."""
    try:
        builtin: Callable[[bytes], Any] = importlib.import_module("_sha256").sha256
        return builtin
    except (ImportError, AttributeError):  # pragma: no cover - other Pythons
        return hashlib.sha256


_sha256 = _line_sha256()

FORMAT_VERSION = 1
GENESIS_PREV = "0" * 64
# One entry is one line; the bound keeps a hostile field (a guest-chosen string, a client's
# certificate name) from bloating the log, and lets readers read a line with a fixed limit.
MAX_ENTRY_BYTES = 64 * 1024
# Domain separation: a checkpoint signature can never be mistaken for any other signature
# made with the same key.
SIGNATURE_CONTEXT = b"isovisor-audit-checkpoint-v1\n"

_KIND = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_REASON = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class EntryType(StrEnum):
    GENESIS = "genesis"
    RECORD = "record"
    CHECKPOINT = "checkpoint"


_COMMON = frozenset({"v", "type", "seq", "ts", "prev"})
FIELDS: dict[EntryType, frozenset[str]] = {
    EntryType.GENESIS: _COMMON | {"log", "key", "pub"},
    EntryType.RECORD: _COMMON | {"kind", "data"},
    EntryType.CHECKPOINT: _COMMON | {"log", "key", "reason", "sig"},
}


# One encoder for every call: json.dumps builds a JSONEncoder, and that a C encoder, per
# call, and the writer encodes an entry per API request. The C encoder (what json.dumps
# uses with these options) is made once; it is built without json's cycle check, which
# nothing needs: record data passes check_depth first (a cycle is refused as too deep),
# and everything else encoded here is built by code or parsed from JSON.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                            allow_nan=False)
_make_c_encoder = getattr(json.encoder, "c_make_encoder", None)
_C_ENCODER = None if _make_c_encoder is None else _make_c_encoder(
    None, _ENCODER.default, json.encoder.encode_basestring_ascii, None,
    _ENCODER.key_separator, _ENCODER.item_separator, True, False, False)


def canonical_text(obj: Mapping[str, Any]) -> str:
    """``canonical`` as text (ASCII)."""
    try:
        if _C_ENCODER is not None:
            text: str = "".join(_C_ENCODER(obj, 0))
            return text
        return _ENCODER.encode(obj)
    except (TypeError, ValueError, RecursionError) as exc:
        raise AuditRecordError(f"not representable as JSON: {exc}") from None


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The one byte encoding of a JSON object used for lines and signatures."""
    return canonical_text(obj).encode("ascii")


def record_line(seq: int, ts: str, prev: str, kind: str, data_json: str) -> bytes:
    """``canonical`` of a record entry, assembled from its parts: ``data_json`` is
    ``canonical_text(data)``, ``kind`` passed ``check_kind``, ``ts`` is what ``timestamp``
    writes and ``prev`` a hex digest, so none of them needs escaping, and the keys are
    written in sorted order (data, kind, prev, seq, ts, type, v). The writer's fast path:
    the same bytes as ``canonical`` of the whole entry (tests/security/audit/test_entry.py),
    without encoding the fixed fields and sorting the keys on every append."""
    return (f'{{"data":{data_json},"kind":"{kind}","prev":"{prev}","seq":{seq},'
            f'"ts":"{ts}","type":"record","v":{FORMAT_VERSION}}}').encode("ascii")


def sha256_hex(data: bytes) -> str:
    digest: str = _sha256(data).hexdigest()
    return digest


def timestamp(when: float) -> str:
    """UTC, microseconds, fixed width: sorts as text and encodes one way only."""
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds")[:-6] + "Z"


_second: tuple[int, str] = (-1, "")  # the last second timestamp_ns formatted, and its text


def timestamp_ns(when_ns: int) -> str:
    """``timestamp`` of ``time.time_ns()`` (microseconds cut, not rounded), formatting
    the date and time only once a second: the writer stamps every entry."""
    global _second
    seconds, nanos = divmod(when_ns, 1_000_000_000)
    cached_second, text = _second
    if seconds != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = (seconds, text)
    return f"{text}.{nanos // 1000:06d}Z"


def parse_timestamp(text: str) -> datetime:
    """Parse what ``timestamp`` writes (ValueError otherwise; callers check the shape)."""
    return datetime.fromisoformat(text[:-1] + "+00:00") if text.endswith("Z") \
        else datetime.strptime(text, _TS_FORMAT)


MAX_DEPTH = 16  # nesting of record data; far below what the JSON parser can take back


def check_depth(value: object, depth: int = 0) -> None:
    """Refuse data nested deeper than MAX_DEPTH (it could not be read back safely): a
    value at depth MAX_DEPTH + 1 or below. Only containers are descended into."""
    if depth > MAX_DEPTH:
        raise AuditRecordError(f"record data is nested deeper than {MAX_DEPTH} levels")
    children: Iterable[object]
    if isinstance(value, dict):
        children = value.values()
    elif isinstance(value, list | tuple):
        children = value
    else:
        return
    if depth == MAX_DEPTH and children:  # its values would be at MAX_DEPTH + 1
        raise AuditRecordError(f"record data is nested deeper than {MAX_DEPTH} levels")
    for v in children:
        if isinstance(v, dict | list | tuple):
            check_depth(v, depth + 1)


_GOOD_KINDS: set[str] = set()  # kinds already checked (bounded: kinds are few)


def check_kind(kind: str) -> None:
    if type(kind) is str and kind in _GOOD_KINDS:
        return
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise AuditRecordError(
            f"record kind {kind!r} must be 1-64 characters of a-z, 0-9, '.', '_' or '-' "
            "starting with a letter")
    if len(_GOOD_KINDS) < 1024:
        _GOOD_KINDS.add(kind)


@dataclass(frozen=True)
class Entry:
    """A decoded entry with its exact line bytes (no newline) and their hash."""

    line: bytes
    fields: Mapping[str, Any]
    hash: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash", sha256_hex(self.line))

    @property
    def type(self) -> EntryType:
        return EntryType(self.fields["type"])

    @property
    def seq(self) -> int:
        seq: int = self.fields["seq"]
        return seq

    @property
    def prev(self) -> str:
        prev: str = self.fields["prev"]
        return prev

    @property
    def ts(self) -> str:
        ts: str = self.fields["ts"]
        return ts

    @property
    def kind(self) -> str:
        """The record kind; for other entry types, the entry type itself."""
        return str(self.fields.get("kind", self.fields["type"]))

    def signed_message(self) -> bytes:
        """What a checkpoint's signature covers: every field but ``sig``."""
        return SIGNATURE_CONTEXT + canonical(
            {k: v for k, v in self.fields.items() if k != "sig"})

    def signature(self) -> bytes:
        return base64.b64decode(self.fields["sig"], validate=True)


def encode(fields: Mapping[str, Any], *, check: bool = True) -> Entry:
    """Encode an entry; it decodes back to itself. ``check=False`` is for the writer, whose
    fields are built by code (only the caller's kind and data vary, and it checks those)."""
    line = canonical(fields)
    if len(line) > MAX_ENTRY_BYTES:
        raise AuditRecordError(
            f"entry of {len(line)} bytes exceeds the {MAX_ENTRY_BYTES}-byte limit")
    entry = Entry(line, dict(fields))
    if check:
        try:
            _check_fields(entry.fields)
        except EntryFormatError as exc:
            raise AuditRecordError(str(exc)) from None
    return entry


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise EntryFormatError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise EntryFormatError(f"non-finite number {name}")


def decode(line: bytes) -> Entry:
    """Parse one line (without its newline); EntryFormatError says what is wrong."""
    if len(line) > MAX_ENTRY_BYTES:
        raise EntryFormatError(f"line of {len(line)} bytes exceeds {MAX_ENTRY_BYTES}")
    try:
        text = line.decode("ascii")
        obj = json.loads(text, object_pairs_hook=_reject_duplicates,
                         parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise EntryFormatError("not ASCII") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        if isinstance(exc, EntryFormatError):
            raise
        raise EntryFormatError(f"not JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    except RecursionError:
        raise EntryFormatError("nested too deeply") from None
    if not isinstance(obj, dict):
        raise EntryFormatError("not a JSON object")
    _check_fields(obj)
    try:
        again = canonical(obj)
    except AuditRecordError as exc:
        raise EntryFormatError(str(exc)) from None
    if again != line:
        raise EntryFormatError("not in canonical form")
    return Entry(line, obj)


def _check_fields(obj: Mapping[str, Any]) -> None:
    type_name = obj.get("type")
    if type_name not in FIELDS:
        raise EntryFormatError(f"unknown entry type {type_name!r}")
    etype = EntryType(type_name)
    keys = set(obj)
    if keys != FIELDS[etype]:
        missing = sorted(FIELDS[etype] - keys)
        extra = sorted(keys - FIELDS[etype])
        raise EntryFormatError(f"{etype} entry fields wrong (missing {missing}, extra {extra})")
    if obj["v"] != FORMAT_VERSION or isinstance(obj["v"], bool):
        raise EntryFormatError(f"format version {obj['v']!r} is not {FORMAT_VERSION}")
    seq = obj["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise EntryFormatError(f"seq {seq!r} is not a non-negative integer")
    if not isinstance(obj["ts"], str) or not _TS.match(obj["ts"]):
        raise EntryFormatError(f"timestamp {obj['ts']!r} is malformed")
    try:
        parse_timestamp(obj["ts"])
    except ValueError:
        raise EntryFormatError(f"timestamp {obj['ts']!r} is not a date") from None
    if not isinstance(obj["prev"], str) or not _HEX64.match(obj["prev"]):
        raise EntryFormatError("prev is not a SHA-256 hex digest")
    if etype is EntryType.RECORD:
        if not isinstance(obj["kind"], str) or not _KIND.match(obj["kind"]):
            raise EntryFormatError(f"record kind {obj['kind']!r} is malformed")
        if not isinstance(obj["data"], dict):
            raise EntryFormatError("record data is not an object")
        return
    for name in ("log", "key"):
        if not isinstance(obj[name], str) or not _HEX32.match(obj[name]):
            raise EntryFormatError(f"{name} id is not 32 hex digits")
    if etype is EntryType.GENESIS:
        if seq != 0 or obj["prev"] != GENESIS_PREV:
            raise EntryFormatError("a genesis entry must have seq 0 and an all-zero prev")
        _check_b64(obj["pub"], 32, "pub")
    else:
        if not isinstance(obj["reason"], str) or not _REASON.match(obj["reason"]):
            raise EntryFormatError(f"checkpoint reason {obj['reason']!r} is malformed")
        _check_b64(obj["sig"], 64, "sig")


def _check_b64(value: object, length: int, name: str) -> None:
    if not isinstance(value, str):
        raise EntryFormatError(f"{name} is not a string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EntryFormatError(f"{name} is not base64") from None
    if len(raw) != length or base64.b64encode(raw).decode("ascii") != value:
        raise EntryFormatError(f"{name} is not {length} bytes in canonical base64")
