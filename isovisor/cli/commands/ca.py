"""`isovisor ca`: the host certificate authority (init, issue, revoke, list)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path
from typing import TYPE_CHECKING

from isovisor.cli.config import DEFAULT_ENDPOINT, show, write_client_config
from isovisor.cli.errors import CliError
from isovisor.host.config import DEFAULT_STATE_DIR

if TYPE_CHECKING:
    from isovisor.security.pki import CertificateAuthority


def _default_dir() -> Path:
    return Path(os.environ.get("ISOVISOR_CA_DIR", str(DEFAULT_STATE_DIR / "ca")))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = sub.add_parser("ca", help="the host certificate authority",
                        description="Create the host CA, issue and revoke certificates. "
                        "Works on the CA directory directly (run on the host).")
    ca.add_argument("--dir", type=Path, default=None,
                    help="CA directory (default $ISOVISOR_CA_DIR or /var/lib/isovisor/ca)")
    cmds = ca.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)

    init = cmds.add_parser("init", help="create the CA")
    init.add_argument("--name", default="isovisor host CA", help="CA common name")
    init.set_defaults(handler=cmd_init)

    issue = cmds.add_parser("issue", help="issue a client (or server) certificate")
    issue.add_argument("name", help="principal name (the certificate's common name)")
    issue.add_argument("--out", type=Path, default=Path("."),
                       help="directory for NAME.crt and NAME.key (default .)")
    issue.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    issue.add_argument("--server", action="store_true", help="a server certificate")
    issue.add_argument("--dns", action="append", default=[], help="server DNS name")
    issue.add_argument("--ip", action="append", default=[], help="server IP address")
    issue.add_argument("--write-config", type=Path, metavar="FILE",
                       help="also write a client config file using this certificate")
    issue.add_argument("--endpoint", default=DEFAULT_ENDPOINT,
                       help=f"endpoint for --write-config (default {DEFAULT_ENDPOINT})")
    issue.add_argument("--tenant", help="default tenant for --write-config")
    issue.set_defaults(handler=cmd_issue)

    revoke = cmds.add_parser("revoke", help="revoke by serial number or by name")
    revoke.add_argument("which", help="serial (decimal or 0x-hex) or principal name")
    revoke.set_defaults(handler=cmd_revoke)

    lst = cmds.add_parser("list", help="certificates issued by this CA")
    lst.add_argument("--output", "-o", choices=["table", "json"], default="table")
    lst.set_defaults(handler=cmd_list)


def _ca(args: argparse.Namespace) -> CertificateAuthority:
    from isovisor.security.pki import CertificateAuthority, PkiError

    try:
        return CertificateAuthority.load(args.dir or _default_dir())
    except PkiError as exc:
        raise CliError(str(exc)) from exc


def cmd_init(args: argparse.Namespace) -> int:
    from isovisor.security.pki import CertificateAuthority, PkiError

    directory = args.dir or _default_dir()
    try:
        ca = CertificateAuthority.init(directory, args.name)
    except (PkiError, OSError) as exc:
        raise CliError(str(exc)) from exc
    print(f"CA created in {directory}: certificate {ca.cert_path}, CRL {ca.crl_path}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    if args.days < 1:
        raise CliError("--days must be at least 1")
    from isovisor.security.pki import PkiError
    from isovisor.security.pki.files import PRIVATE_MODE, PUBLIC_MODE, write_atomic

    ca = _ca(args)
    try:
        issued = ca.issue(args.name, server=args.server, dns_names=args.dns,
                          ip_addresses=args.ip, validity=dt.timedelta(days=args.days))
    except PkiError as exc:
        raise CliError(str(exc)) from exc
    args.out.mkdir(parents=True, exist_ok=True)
    cert, key = args.out / f"{args.name}.crt", args.out / f"{args.name}.key"
    write_atomic(key, issued.key_pem, PRIVATE_MODE)
    write_atomic(cert, issued.cert_pem, PUBLIC_MODE)
    print(f"issued {'server' if args.server else 'client'} certificate {issued.serial:x} "
          f"for {args.name!r}: {cert}, key {key} (0600)")
    if args.write_config:
        write_client_config(args.write_config, args.endpoint, ca.cert_path.resolve(),
                            cert.resolve(), key.resolve(), args.tenant)
        print(f"client config written to {args.write_config}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from isovisor.security.pki import PkiError

    ca = _ca(args)
    try:
        revoked = ca.revoke(args.which)
    except PkiError as exc:
        raise CliError(str(exc)) from exc
    for r in revoked:
        print(f"revoked {r.serial:x} ({r.name}); CRL re-signed: {ca.crl_path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    rows = [{"serial": f"{r.serial:x}", "name": r.name, "kind": r.kind,
             "notAfter": r.not_after[:19], "revokedAt": (r.revoked_at or "")[:19] or None}
            for r in _ca(args).issued()]
    show(args, rows, [("SERIAL", lambda r: r["serial"][:16]), ("NAME", lambda r: r["name"]),
                      ("KIND", lambda r: r["kind"]), ("NOT AFTER", lambda r: r["notAfter"]),
                      ("REVOKED", lambda r: r["revokedAt"])])
    return 0

