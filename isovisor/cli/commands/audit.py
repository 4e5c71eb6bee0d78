"""`isovisor audit`: verify, export and show the host's tamper-evident audit log; keygen.

Reading needs only read access to the log (the daemon's user or the auditors' group);
nothing here writes to the log.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

from isovisor.cli.errors import CliError

# Spelled out here so that building the parser does not import the audit package.
_DIR_DEFAULT = "$ISOVISOR_AUDIT_DIR or /var/lib/isovisor/audit"
_KEY_DEFAULT = "$ISOVISOR_AUDIT_KEY or /var/lib/isovisor/keys/audit.key"

EXIT_VERIFIED = 0
EXIT_UNPROVEN = 3
EXIT_TAMPERED = 4
_ANCHOR = re.compile(r"^(\d+):([0-9a-f]{64})$")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser(
        "audit", help="verify, export or show the audit log",
        description="The host's tamper-evident audit log: every management request, VM "
        "lifecycle transition and security event, hash-chained and signed.")
    cmds = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    v = cmds.add_parser(
        "verify", help="check the chain and signatures; name the first bad entry",
        description="Check every entry's hash chain and every checkpoint's Ed25519 "
        "signature, name the first bad entry, and say what cannot be proven. Exit status: "
        f"{EXIT_VERIFIED} verified, {EXIT_TAMPERED} tampered (altered, missing, inserted, "
        f"reordered or cut entries), {EXIT_UNPROVEN} nothing wrong found but the end of the "
        "log is not signed, 1 error.")
    _dir_arg(v, allow_file=True)
    v.add_argument("--key", type=Path, metavar="PUBKEY",
                   help="the audit public key (PEM), ideally a copy kept off the host "
                   "(default: audit.pub in the log directory, which proves less)")
    v.add_argument("--anchor", action="append", default=[], metavar="SEQ:SHA256",
                   help="an entry hash known from elsewhere (syslog copy, earlier verify); "
                   "proves nothing up to it was removed; repeatable")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(handler=cmd_verify)

    e = cmds.add_parser(
        "export", help="write the log as JSON lines",
        description="Write entries as JSON lines. Without filters the output is the whole "
        "log byte for byte, verifiable with `isovisor audit verify --dir FILE`.")
    _dir_arg(e, allow_file=True)
    e.add_argument("--out", type=Path, help="output file (default: standard output)")
    _filter_args(e)
    e.set_defaults(handler=cmd_export)

    s = cmds.add_parser("show", help="list recent entries as a table",
                        description="List entries, newest last, one line each.")
    _dir_arg(s, allow_file=True)
    s.add_argument("--tail", type=int, default=50, metavar="N",
                   help="show the last N matching entries (default 50; 0 for all)")
    s.add_argument("--all", action="store_true", help="include genesis and checkpoints")
    _filter_args(s)
    s.set_defaults(handler=cmd_show)

    k = cmds.add_parser("keygen", help="create the host's Ed25519 audit key",
                        description="Create the audit signing key (mode 0600) and its public "
                        "half beside it (.pub); copy the .pub off the host for verification.")
    k.add_argument("--key", type=Path, default=None, metavar="PATH",
                   help=f"private key path (default {_KEY_DEFAULT})")
    k.set_defaults(handler=cmd_keygen)


def _dir_arg(p: argparse.ArgumentParser, *, allow_file: bool) -> None:
    p.add_argument("--dir", type=Path, default=None, metavar="D",
                   help=f"log directory{' or exported file' if allow_file else ''} "
                   f"(default {_DIR_DEFAULT})")


def _filter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", metavar="PREFIX",
                   help="only records of this kind or its sub-kinds, e.g. api or security")
    p.add_argument("--since", type=_since, metavar="TIME",
                   help="only entries at or after TIME (ISO 8601; UTC unless an offset is given)")


def _since(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _parse_anchor(text: str) -> tuple[int, str]:
    m = _ANCHOR.match(text.strip().lower())
    if not m:
        raise CliError(f"anchor {text!r} is not SEQ:SHA256 (a number, a colon, 64 hex digits)")
    return int(m.group(1)), m.group(2)


def cmd_verify(args: argparse.Namespace) -> int:
    from isovisor.security.audit import AuditError, load_public_key, verify_log
    from isovisor.security.audit.chain import Anchor
    from isovisor.security.audit.segments import PUBLIC_KEY_NAME
    from isovisor.security.audit.verify import Status

    target: Path = args.dir or _default_dir()
    anchors = [Anchor(*_parse_anchor(a)) for a in args.anchor]
    from_log_dir = args.key is None
    key_path: Path = args.key or (target if target.is_dir() else target.parent) / PUBLIC_KEY_NAME
    try:
        public = load_public_key(key_path)
        report = verify_log(target, public, key_source=str(key_path),
                            key_from_log_dir=from_log_dir, anchors=anchors)
    except AuditError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot read the audit log at {target}: {exc.strerror}") from None
    if args.json:
        c = report.chain
        print(json.dumps({
            "status": report.status.value,
            "first_bad": None if report.bad is None else {
                "segment": report.bad.location.segment, "line": report.bad.location.line,
                "seq": report.bad.location.seq, "problem": report.bad.message},
            "entries": c.entries, "records": c.records, "checkpoints": c.checkpoints,
            "head": None if c.last is None else {"seq": c.last.entry.seq,
                                                 "sha256": c.last.entry.hash},
            "last_checkpoint": None if c.last_checkpoint is None else {
                "seq": c.last_checkpoint.entry.seq, "sha256": c.last_checkpoint.entry.hash},
            "key": report.key_id, "unproven": report.unproven, "notes": report.notes,
        }, indent=2))
    else:
        print("\n".join(report.lines()))
    return {Status.VERIFIED: EXIT_VERIFIED, Status.UNPROVEN: EXIT_UNPROVEN,
            Status.TAMPERED: EXIT_TAMPERED}[report.status]


def cmd_export(args: argparse.Namespace) -> int:
    from isovisor.security.audit import AuditError
    from isovisor.security.audit.export import export

    target: Path = args.dir or _default_dir()
    try:
        if args.out is None:
            stats = export(target, sys.stdout.buffer, kind=args.kind, since=args.since)
            sys.stdout.buffer.flush()
        else:
            with open(args.out, "xb") as out:
                stats = export(target, out, kind=args.kind, since=args.since)
    except AuditError as exc:
        raise CliError(str(exc)) from None
    except FileExistsError:
        raise CliError(f"{args.out} already exists; choose another file") from None
    except OSError as exc:
        raise CliError(f"export failed: {exc.strerror}: {exc.filename}") from None
    _warn_unread(stats.damaged, stats.partial)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from isovisor.security.audit import AuditError, EntryType
    from isovisor.security.audit.export import ReadStats, matches, read_entries, summary

    if args.tail < 0:
        raise CliError("--tail must be 0 or more")
    target: Path = args.dir or _default_dir()
    stats = ReadStats()
    rows: deque[tuple[str, str, str, str]] = deque(maxlen=args.tail or None)
    try:
        for _loc, entry in read_entries(target, stats):
            if not args.all and entry.type is not EntryType.RECORD:
                continue
            if matches(entry, args.kind, args.since):
                rows.append((str(entry.seq), entry.ts, entry.kind, summary(entry)))
    except AuditError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot read the audit log at {target}: {exc.strerror}") from None
    header = ("SEQ", "TIME (UTC)", "KIND", "WHAT")
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3])
    _warn_unread(stats.damaged, stats.partial)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from isovisor.security.audit import AuditError, generate_key
    from isovisor.security.audit.keys import public_key_path
    from isovisor.security.audit.paths import default_key

    path: Path = args.key or default_key()
    try:
        key = generate_key(path)
    except AuditError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot create the audit key at {path}: {exc.strerror}") from None
    print(f"audit key {key.key_id}: private {path}, public {public_key_path(path)}")
    return 0


def _default_dir() -> Path:
    from isovisor.security.audit.paths import default_dir

    return default_dir()


def _warn_unread(damaged: int, partial: int) -> None:
    if damaged or partial:
        print(f"isovisor: {damaged} damaged and {partial} incomplete lines were skipped; run "
              "`isovisor audit verify`", file=sys.stderr)
