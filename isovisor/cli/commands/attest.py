"""`isovisor attest`: TPM quotes over isovisor's PCRs with the event log, and their offline
verification (isovisor.security.integrity.attestation, docs/SECURITY.md).

    isovisor attest nonce                        a fresh nonce (issue time + 128 random bits)
    isovisor attest --nonce N [--out FILE]       quote bundle from the daemon's TPM and log
    isovisor attest key                          the TPM's attestation key (PEM), to pin
    isovisor attest verify --bundle FILE --nonce N --ak AK.pem --policy P --policy-key K

Quoting runs on the host beside isovisord (root: it reaches the daemon's TPM and event log
in STATE_DIR/integrity); verifying needs only the files named.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from isovisor.cli.errors import CliError

if TYPE_CHECKING:
    from isovisor.security.integrity.eventlog import EventLogFile
    from isovisor.security.tpm import Tpm

ACTIONS = ("quote", "nonce", "key", "verify")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("attest", help="TPM quote of the measured launch; offline verification",
                       description=__doc__.split("\n\n")[0] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    p.add_argument("action", nargs="?", choices=ACTIONS, default="quote",
                   help="quote (default), nonce, key or verify")
    p.add_argument("--nonce", help="the verifier's nonce (quote, verify)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="the daemon's state directory (default /var/lib/isovisor)")
    p.add_argument("--out", type=Path, help="write the bundle or key here (default stdout)")
    p.add_argument("--bundle", type=Path, help="verify: the quote bundle")
    p.add_argument("--ak", type=Path, help="verify: the pinned attestation key (PEM)")
    p.add_argument("--policy", type=Path, help="verify: the signed launch policy")
    p.add_argument("--policy-key", type=Path, help="verify: the policy's public key")
    p.add_argument("--max-age", type=float, default=None,
                   help="verify: seconds a nonce stays fresh (default 300)")
    p.set_defaults(handler=cmd_attest)


def _emit(text: str, out: Path | None) -> None:
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)


def _tpm_and_log(state_dir: Path | None) -> tuple[Tpm, EventLogFile]:
    from isovisor.host.config import DEFAULT_STATE_DIR
    from isovisor.host.integrity import tpm_file
    from isovisor.security.integrity.eventlog import EventLogFile
    from isovisor.security.tpm import Tpm, TpmAddress

    path = tpm_file(state_dir or DEFAULT_STATE_DIR)
    try:
        info = json.loads(path.read_text())
        address = TpmAddress(str(info["tcti"]), str(info["conf"]))
        log_path = Path(info["event_log"])
    except (OSError, ValueError, KeyError) as exc:
        raise CliError(f"cannot read {path} (is isovisord running with its [integrity] "
                       f"table?): {exc}") from None
    return Tpm(address), EventLogFile(log_path)


def cmd_attest(args: argparse.Namespace) -> int:
    from isovisor.security.integrity import attestation
    from isovisor.security.integrity.errors import IntegrityError
    from isovisor.security.tpm import TpmError

    try:
        if args.action == "nonce":
            print(attestation.issue_nonce())
        elif args.action == "key":
            tpm, _ = _tpm_and_log(args.state_dir)
            _emit(tpm.attestation_key_pem().decode(), args.out)
        elif args.action == "quote":
            if not args.nonce:
                raise CliError("attest needs --nonce (from the verifier: `isovisor attest "
                               "nonce`)")
            tpm, log_file = _tpm_and_log(args.state_dir)
            bundle = attestation.make_bundle(tpm, log_file, args.nonce)
            _emit(json.dumps(bundle, indent=1) + "\n", args.out)
        else:
            return _verify(args)
    except (IntegrityError, TpmError) as exc:
        raise CliError(str(exc)) from None
    return 0


def _verify(args: argparse.Namespace) -> int:
    from isovisor.security.integrity import attestation
    from isovisor.security.integrity.policy import load_policy
    from isovisor.security.integrity.signing import load_public_key

    missing = [f"--{n.replace('_', '-')}" for n in ("bundle", "nonce", "ak", "policy",
                                                     "policy_key") if not getattr(args, n)]
    if missing:
        raise CliError(f"attest verify needs {', '.join(missing)}")
    try:
        raw, ak = args.bundle.read_bytes(), args.ak.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {exc.filename}: {exc.strerror}") from None
    policy = load_policy(args.policy, load_public_key(args.policy_key))
    verified = attestation.verify_bundle(
        attestation.load_bundle(raw), expected_nonce=args.nonce, ak_pem=ak, policy=policy,
        max_age=args.max_age if args.max_age is not None else attestation.DEFAULT_MAX_AGE_S)
    pcrs = ", ".join(f"PCR {p} {v[:16]}..." for p, v in verified.pcrs.items())
    print(f"verified: quote for nonce {verified.nonce} ({verified.age_s:.0f} s old), "
          f"{verified.events} events accepted by the policy, {pcrs}, TPM boot "
          f"{verified.boot}")
    return 0
