"""`isovisor integrity`: the install-time steps of VMM and platform integrity.

    isovisor integrity keygen --out release.key          Ed25519 key (+ release.pub)
    isovisor integrity manifest build --key release.key --out manifest.json
    isovisor integrity manifest verify --manifest manifest.json --release-key release.pub
    isovisor integrity policy build --key policy.key --out policy.json \\
        --manifest manifest.json --release-key release.pub
    isovisor integrity dev-setup --dir .isovisor         development keys (made once),
                                                         manifest, policy, daemon config

`policy build` accepts exactly this host's current measurements and the manifest's digest;
review it, widen what should be widened, and sign it again (edit the document, then
`policy sign`). isovisord's [integrity] table names these files (isovisor.host.integrity).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from isovisor.cli.errors import CliError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("integrity", help="signed code manifest and launch policy (install)",
                       description=__doc__.split("\n\n")[0] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    p.add_argument("what", choices=("keygen", "manifest", "policy", "dev-setup"))
    p.add_argument("action", nargs="?", choices=("build", "verify", "sign"), default=None)
    p.add_argument("--key", type=Path, help="the Ed25519 private key that signs")
    p.add_argument("--out", type=Path, help="the file to write")
    p.add_argument("--manifest", type=Path, help="the signed manifest")
    p.add_argument("--release-key", type=Path, help="the release public key (pinned)")
    p.add_argument("--code-root", type=Path, default=None,
                   help="the code tree (default: the running isovisor package)")
    p.add_argument("--measure-root", type=Path, default=Path("/"),
                   help="policy build: where the measured files are (default /)")
    p.add_argument("--dir", type=Path,
                   help="dev-setup: the directory of the development keys and files")
    p.add_argument("--document", type=Path,
                   help="policy sign: an unsigned policy document (JSON) to sign")
    p.set_defaults(handler=cmd_integrity)


def _need(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is None]
    if missing:
        raise CliError(f"integrity {args.what} {args.action or ''} needs "
                       f"{', '.join(missing)}".replace("  ", " "))


def cmd_integrity(args: argparse.Namespace) -> int:
    from isovisor.security.integrity.errors import IntegrityError

    try:
        return _run(args)
    except IntegrityError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"{exc.filename or ''}: {exc.strerror or exc}") from None


def _run(args: argparse.Namespace) -> int:
    from isovisor.security.integrity import manifest as mf
    from isovisor.security.integrity import policy as pol
    from isovisor.security.integrity.measurements import collect, manifest_measurement
    from isovisor.security.integrity.signing import (
        generate_key,
        load_private_key,
        load_public_key,
        write_signed,
    )

    if args.what == "dev-setup":
        from isovisor.security.integrity.devsetup import dev_setup

        _need(args, "dir")
        for line in dev_setup(args.dir, args.code_root, args.measure_root).lines:
            print(f"integrity: {line}")
    elif args.what == "keygen":
        _need(args, "out")
        pub = generate_key(args.out)
        print(f"wrote {args.out} (private, 0600) and {pub}")
    elif args.what == "manifest" and args.action == "build":
        _need(args, "key", "out")
        mf.build_manifest(args.out, load_private_key(args.key), args.code_root)
        m = json.loads(args.out.read_text())["document"]
        print(f"wrote {args.out}: {len(m['files'])} files under {m['code_root']} and the "
              "interpreter, signed")
    elif args.what == "manifest" and args.action == "verify":
        _need(args, "manifest", "release_key")
        m = mf.verify_manifest(args.manifest, load_public_key(args.release_key),
                               args.code_root)
        print(f"{args.manifest}: signature and {len(m.files)} files verify (digest "
              f"{m.digest})")
    elif args.what == "policy" and args.action == "build":
        _need(args, "key", "out", "manifest", "release_key")
        m = mf.load_manifest(args.manifest, load_public_key(args.release_key))
        measured = [*collect(args.measure_root), manifest_measurement(m.digest)]
        pol.build_policy(args.out, load_private_key(args.key), measured)
        print(f"wrote {args.out}: accepts this host's {len(measured)} current measurements")
    elif args.what == "policy" and args.action == "sign":
        _need(args, "key", "out", "document")
        doc = json.loads(args.document.read_text())
        pol.parse_policy(doc, str(args.document))
        write_signed(args.out, doc, load_private_key(args.key))
        print(f"wrote {args.out}")
    else:
        raise CliError(f"integrity {args.what}: choose an action (build, verify or sign)")
    return 0
