"""The development install step of VMM and platform integrity (`make setup`):

    isovisor integrity dev-setup --dir .isovisor

In DIR (0700, git-ignored in a checkout):

| file | what |
|---|---|
| release-key, release-key.pub | Ed25519 development release key (0600), made once |
| policy-key, policy-key.pub | Ed25519 development policy key (0600), made once |
| manifest.json | the signed code manifest of the running isovisor package |
| policy.json | the signed launch policy accepting this host's current measurements |
| isovisord.toml | isovisord's `[integrity]` table naming them (`--config` it) |

It is idempotent: the keys are never replaced, the manifest is rebuilt only when it no
longer verifies (a code file, the interpreter or the key changed), and the policy only
when it does not accept the current measurements and manifest digest. A production host
keeps both private keys off the host (docs/INTEGRITY.md, "Setting it up"); these
development keys sit beside the code they sign and prove only that the tree is unchanged
since `make setup`.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from isovisor.security.integrity.errors import IntegrityError
from isovisor.security.integrity.eventlog import Event
from isovisor.security.integrity.gate import CODE_PCR, PLATFORM_PCR
from isovisor.security.integrity.manifest import build_manifest, verify_manifest
from isovisor.security.integrity.measurements import (
    CODE,
    Measurement,
    collect,
    manifest_measurement,
)
from isovisor.security.integrity.policy import build_policy, load_policy
from isovisor.security.integrity.signing import (
    generate_key,
    load_private_key,
    load_public_key,
    write_public_key,
)

RELEASE_KEY = "release-key"
POLICY_KEY = "policy-key"
MANIFEST = "manifest.json"
POLICY = "policy.json"
DAEMON_CONFIG = "isovisord.toml"


@dataclass(frozen=True)
class DevIntegrity:
    """The files of a development install in `dir`."""

    dir: Path

    @property
    def release_key(self) -> Path:
        return self.dir / RELEASE_KEY

    @property
    def release_pub(self) -> Path:
        return self.dir / f"{RELEASE_KEY}.pub"

    @property
    def policy_key(self) -> Path:
        return self.dir / POLICY_KEY

    @property
    def policy_pub(self) -> Path:
        return self.dir / f"{POLICY_KEY}.pub"

    @property
    def manifest(self) -> Path:
        return self.dir / MANIFEST

    @property
    def policy(self) -> Path:
        return self.dir / POLICY

    @property
    def daemon_config(self) -> Path:
        return self.dir / DAEMON_CONFIG

    def config_table(self) -> dict[str, str]:
        """isovisord's [integrity] table for these files."""
        return {"manifest": str(self.manifest), "release_key": str(self.release_pub),
                "policy": str(self.policy), "policy_key": str(self.policy_pub)}

    def missing(self) -> list[Path]:
        return [p for p in (self.release_pub, self.policy_pub, self.manifest, self.policy)
                if not p.is_file()]


@dataclass
class SetupReport:
    lines: list[str] = field(default_factory=list)
    manifest_digest: str = ""


def _private_key(path: Path, report: SetupReport) -> None:
    """Make the key once; refuse one that others can read; restore a lost .pub."""
    pub = path.with_name(f"{path.name}.pub")
    if not path.exists():
        generate_key(path)
        report.lines.append(f"{path}: new development Ed25519 key (0600), public key {pub}")
        return
    mode = stat.S_IMODE(path.lstat().st_mode)
    if not stat.S_ISREG(path.lstat().st_mode) or mode & 0o077:
        raise IntegrityError(f"{path} is mode {mode:04o} (or not a regular file): a signing "
                             "key must be 0600; fix it or delete it to make a new one")
    write_public_key(pub, load_private_key(path).public_key())
    report.lines.append(f"{path}: kept")


def _manifest(files: DevIntegrity, code_root: Path | None, report: SetupReport) -> str:
    release_pub = load_public_key(files.release_pub)
    if files.manifest.exists():
        try:
            m = verify_manifest(files.manifest, release_pub, code_root)
            report.lines.append(f"{files.manifest}: up to date ({len(m.files)} files, "
                                f"digest {m.digest[:16]}...)")
            return m.digest
        except IntegrityError as exc:
            report.lines.append(f"{files.manifest}: rebuilt ({exc})")
    else:
        report.lines.append(f"{files.manifest}: built")
    build_manifest(files.manifest, load_private_key(files.release_key), code_root)
    m = verify_manifest(files.manifest, release_pub, code_root)
    report.lines[-1] += f", {len(m.files)} files, digest {m.digest[:16]}..."
    return m.digest


def _policy(files: DevIntegrity, measured: list[Measurement], report: SetupReport) -> None:
    if files.policy.exists():
        try:
            policy = load_policy(files.policy, load_public_key(files.policy_pub))
            refusals = policy.check(
                Event(CODE_PCR if m.kind == CODE else PLATFORM_PCR, m.name, m.value)
                for m in measured)
            if not refusals:
                report.lines.append(f"{files.policy}: up to date (accepts this host)")
                return
            why = refusals[0] + (f" (and {len(refusals) - 1} more)" if len(refusals) > 1
                                 else "")
            report.lines.append(f"{files.policy}: re-signed to accept this host: {why}")
        except IntegrityError as exc:
            report.lines.append(f"{files.policy}: re-signed ({exc})")
    else:
        report.lines.append(f"{files.policy}: signed")
    build_policy(files.policy, load_private_key(files.policy_key), measured)
    report.lines[-1] += f", accepts {len(measured)} current measurements"


def _daemon_config(files: DevIntegrity) -> None:
    body = "# isovisord --config this file: the launch gate with the development keys\n"
    body += "[integrity]\n" + "".join(
        f"{k} = {json.dumps(v)}\n" for k, v in files.config_table().items())
    tmp = files.daemon_config.with_name(files.daemon_config.name + ".tmp")
    tmp.write_text(body)
    os.replace(tmp, files.daemon_config)


def dev_setup(directory: Path, code_root: Path | None = None,
              measure_root: Path = Path("/")) -> SetupReport:
    """Keys once, then a manifest and a policy that hold for the code and host now."""
    files = DevIntegrity(directory.resolve())
    files.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(files.dir, 0o700)
    report = SetupReport()
    _private_key(files.release_key, report)
    _private_key(files.policy_key, report)
    report.manifest_digest = _manifest(files, code_root, report)
    measured = [*collect(measure_root), manifest_measurement(report.manifest_digest)]
    _policy(files, measured, report)
    _daemon_config(files)
    report.lines.append(f"{files.daemon_config}: isovisord's [integrity] table")
    return report


__all__ = ["DevIntegrity", "SetupReport", "dev_setup"]
