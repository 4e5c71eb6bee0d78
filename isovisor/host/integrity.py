"""The daemon's platform and VMM integrity: its TPM, the measured launch and the launch
gate before every VM launch (isovisor.security.integrity, docs/SECURITY.md).

Configured by the `[integrity]` table of isovisord's config file:

    [integrity]
    manifest = "/etc/isovisor/manifest.json"   # signed at install (isovisor integrity)
    release_key = "/etc/isovisor/release.pub"  # pinned Ed25519 key that signs it
    policy = "/etc/isovisor/policy.json"
    policy_key = "/etc/isovisor/policy.pub"    # pinned Ed25519 key that signs the policy
    tpm = "auto"          # auto: /dev/tpmrm0 when present, else a swtpm in STATE/integrity
    platform_pcr = 12     # host configuration measurements
    code_pcr = 13         # the manifest digest
    # For tests only: another code tree than the running package, another root for the
    # measured files.
    code_root = "..."
    measure_root = "/"

Without the table VMs are NOT gated: the daemon starts them without any of these checks
and says so at start (a warning in its log and its start-up line). `make setup` writes a
development table to .isovisor/isovisord.toml (isovisor.security.integrity.devsetup).
A refusal answers 503 LaunchRefused with the gate's sentence and is written to the audit
log as security.integrity-failure (a code file differs) or security.launch-gate-refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from isovisor.host.errors import LaunchRefused
from isovisor.host.lifecycle import VmLifecycle
from isovisor.host.models import Vm
from isovisor.security.audit.recorders import (
    AuditSink,
    record_security_event,
    record_vm_security_event,
)
from isovisor.security.integrity.errors import IntegrityError
from isovisor.security.integrity.gate import (
    CODE_PCR,
    KIND_GATE,
    PLATFORM_PCR,
    GateConfig,
    GateReport,
    LaunchGate,
)
from isovisor.security.integrity.gate import LaunchRefused as GateRefusal
from isovisor.security.tpm import Swtpm, Tpm, TpmAddress
from isovisor.security.tpm.client import HOST_TPM

log = logging.getLogger(__name__)

INTEGRITY_DIR = "integrity"
EVENT_LOG = "eventlog.json"
TPM_FILE = "tpm.json"  # how `isovisor attest` reaches the daemon's TPM
SOURCE = "isovisord"
TPM_MODES = ("auto", "device", "swtpm")
_PATHS = ("manifest", "release_key", "policy", "policy_key")


@dataclass(frozen=True)
class IntegritySettings:
    manifest: Path
    release_key: Path
    policy: Path
    policy_key: Path
    tpm: str = "auto"
    platform_pcr: int = PLATFORM_PCR
    code_pcr: int = CODE_PCR
    code_root: Path | None = None
    measure_root: Path = Path("/")

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> IntegritySettings:
        known = {*_PATHS, "tpm", "platform_pcr", "code_pcr", "code_root", "measure_root"}
        unknown = set(table) - known
        if unknown:
            raise IntegrityError(f"[integrity]: unknown settings {', '.join(sorted(unknown))}")
        missing = [k for k in _PATHS if not isinstance(table.get(k), str)]
        if missing:
            raise IntegrityError(f"[integrity]: {', '.join(missing)} must be set (paths)")
        tpm = table.get("tpm", "auto")
        if tpm not in TPM_MODES:
            raise IntegrityError(f"[integrity] tpm: {tpm!r} is not one of {TPM_MODES}")
        pcrs = {k: table.get(k, d) for k, d in (("platform_pcr", PLATFORM_PCR),
                                                ("code_pcr", CODE_PCR))}
        for k, v in pcrs.items():
            if type(v) is not int or not 0 <= v < 24:
                raise IntegrityError(f"[integrity] {k}: {v!r} is not a PCR index")
        root = table.get("code_root")
        return cls(Path(table["manifest"]), Path(table["release_key"]),
                   Path(table["policy"]), Path(table["policy_key"]), tpm=tpm,
                   platform_pcr=pcrs["platform_pcr"], code_pcr=pcrs["code_pcr"],
                   code_root=Path(root) if root else None,
                   measure_root=Path(table.get("measure_root", "/")))


UNGATED = ("VMs ARE NOT GATED: the config has no [integrity] table, so VMs start without "
           "the launch gate (no code manifest check, no measured launch, no TPM, no policy "
           "check); `make setup` writes one to .isovisor/isovisord.toml")


def tpm_file(state_dir: Path) -> Path:
    return state_dir / INTEGRITY_DIR / TPM_FILE


class HostIntegrity:
    """Owns the TPM (and the swtpm it may start) and the launch gate."""

    def __init__(self, settings: IntegritySettings, state_dir: Path, audit: AuditSink) -> None:
        self.settings = settings
        self.dir = state_dir / INTEGRITY_DIR
        self.audit = audit
        self.swtpm: Swtpm | None = None
        self.gate: LaunchGate | None = None
        self.report: GateReport | None = None  # the first check, when it passed
        self.refusal: str | None = None  # or why it refused

    def open(self) -> GateReport | None:
        """Reach the TPM, then measure once. A failing measurement does not stop the daemon
        (its API says why each start is refused); it is audited now. Returns the report of
        a passing first check."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            return self._open()
        except BaseException:
            self.close()  # never leave the swtpm it started behind
            raise

    def _open(self) -> GateReport | None:
        s = self.settings
        if s.tpm == "device" or (s.tpm == "auto" and HOST_TPM.exists()):
            address = TpmAddress.device(HOST_TPM)
        else:
            self.swtpm = Swtpm(self.dir / "swtpm").start()
            address = TpmAddress.swtpm(self.swtpm.socket_path)
        config = GateConfig(manifest=s.manifest, release_key=s.release_key, policy=s.policy,
                            policy_key=s.policy_key, event_log=self.dir / EVENT_LOG,
                            code_root=s.code_root, measure_root=s.measure_root,
                            platform_pcr=s.platform_pcr, code_pcr=s.code_pcr)
        self.gate = LaunchGate(config, Tpm(address))
        self.gate.open()
        tmp = tpm_file(self.dir.parent).with_suffix(".tmp")
        tmp.write_text(json.dumps({"tcti": address.tcti, "conf": address.conf,
                                   "pcrs": config.pcrs, "event_log": str(config.event_log)}))
        os.replace(tmp, tpm_file(self.dir.parent))
        try:
            self.report = self.gate.check()
        except GateRefusal as exc:
            self._audit(exc, None)
            self.refusal = exc.message
            log.error("launch gate at start: %s", exc.message)
            return None
        log.info("%s", self.summary())
        return self.report

    def summary(self) -> str:
        """One line: whether the first check passed, with the PCRs and the TPM used."""
        tpm = (f"swtpm {self.swtpm.socket_path}" if self.swtpm is not None
               else f"TPM {HOST_TPM}")
        if self.report is None:
            return (f"launch gate ON ({tpm}), REFUSED at start: {self.refusal}; every VM "
                    "start is refused until the check passes")
        r = self.report
        pcrs = ", ".join(f"PCR {p} = {v[:16]}..." for p, v in sorted(r.pcrs.items()))
        return (f"launch gate ON, passed at start: manifest {r.manifest_digest[:16]}... "
                f"verified, {r.events} measurements in the event log replay to {pcrs} "
                f"({tpm})")

    def _audit(self, refusal: GateRefusal, vm: Vm | None) -> None:
        """Fsynced before the API answers (the answer depends on the record)."""
        if vm is None:
            record_security_event(self.audit, kind=refusal.kind, source=SOURCE,
                                  detail=refusal.message)
        else:
            record_vm_security_event(self.audit, kind=refusal.kind, source=SOURCE,
                                     detail=refusal.message, tenant=vm.tenant, vm=vm.name,
                                     vm_id=vm.id, durable=True)

    def check_launch(self, vm: Vm) -> None:
        """The lifecycle's launch gate: raises LaunchRefused (503) with the precise reason
        after writing the audit record (fsynced before the answer)."""
        if self.gate is None:
            raise LaunchRefused("the launch gate is not open")
        try:
            self.gate.check()
        except GateRefusal as exc:
            self._audit(exc, vm)
            raise LaunchRefused(exc.message) from exc
        except Exception as exc:  # a bug in a check must not let the launch through
            log.exception("launch gate failed")
            refusal = GateRefusal(KIND_GATE, f"the launch gate failed: {exc}")
            self._audit(refusal, vm)
            raise LaunchRefused(refusal.message) from exc

    def close(self) -> None:
        if self.swtpm is not None:
            self.swtpm.stop()
            self.swtpm = None


def open_integrity(table: dict[str, Any] | None, state_dir: Path, audit: AuditSink,
                   lifecycle: VmLifecycle) -> HostIntegrity | None:
    """The daemon's start-up step: open the TPM, measure, and gate every launch."""
    if table is None:
        log.warning("%s", UNGATED)
        return None
    integrity = HostIntegrity(IntegritySettings.from_table(table), state_dir, audit)
    integrity.open()
    lifecycle.launch_gate = integrity.check_launch
    return integrity


__all__ = ["KIND_GATE", "UNGATED", "HostIntegrity", "IntegritySettings", "open_integrity",
           "tpm_file"]
