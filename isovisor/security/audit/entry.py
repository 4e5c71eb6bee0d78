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
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from isovisor.security.audit.errors import AuditRecordError, EntryFormatError

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


def canonical(obj: Mapping[str, Any]) -> bytes:
    """The one byte encoding of a JSON object used for lines and signatures."""
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise AuditRecordError(f"not representable as JSON: {exc}") from None
    return text.encode("ascii")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def timestamp(when: float) -> str:
    """UTC, microseconds, fixed width: sorts as text and encodes one way only."""
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def parse_timestamp(text: str) -> datetime:
    """Parse what ``timestamp`` writes (ValueError otherwise; callers check the shape)."""
    return datetime.fromisoformat(text[:-1] + "+00:00") if text.endswith("Z") \
        else datetime.strptime(text, _TS_FORMAT)


MAX_DEPTH = 16  # nesting of record data; far below what the JSON parser can take back


def check_depth(value: object, depth: int = 0) -> None:
    """Refuse data nested deeper than MAX_DEPTH (it could not be read back safely)."""
    if depth > MAX_DEPTH:
        raise AuditRecordError(f"record data is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for v in value.values():
            check_depth(v, depth + 1)
    elif isinstance(value, list | tuple):
        for v in value:
            check_depth(v, depth + 1)


def check_kind(kind: str) -> None:
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise AuditRecordError(
            f"record kind {kind!r} must be 1-64 characters of a-z, 0-9, '.', '_' or '-' "
            "starting with a letter")


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
