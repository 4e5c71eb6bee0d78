"""The launch gate: run before every VM launch (each launch starts its own zygote and
worker). In order, each step refusing with one sentence that names what differed:

1. VMM integrity: the manifest's signature (pinned release key) and every code file's
   SHA-256 (`manifest.verify_manifest`); a refusal names the file.
2. Measured launch: the host's measurements (`measurements.collect`) and the manifest's
   digest; each value that changed since the last event (or was never measured) is
   extended into its PCR and appended to the event log. Unchanged values are not
   extended again, so the log grows only when the platform changes.
3. The event log replayed must equal the PCRs the TPM reports; a PCR extended outside
   the log (or a log edited or lost) refuses every launch until the TPM is reset.
4. The policy (its signature against the pinned policy key, then every event of this TPM
   boot): a value that was ever unacceptable since the last reset keeps refusing.

The PCRs must not be resettable from locality 0 (PCR 16 and 23 are): a value there
proves nothing, so `open` refuses them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from isovisor.security.audit.recorders import SECURITY_INTEGRITY, SECURITY_LAUNCH_GATE
from isovisor.security.integrity.errors import IntegrityError, ManifestError, PolicyError
from isovisor.security.integrity.eventlog import Event, EventLog, EventLogFile
from isovisor.security.integrity.manifest import Manifest, verify_manifest
from isovisor.security.integrity.measurements import (
    ABSENT,
    CODE,
    Measurement,
    collect,
    manifest_measurement,
)
from isovisor.security.integrity.policy import load_policy
from isovisor.security.integrity.signing import load_public_key
from isovisor.security.tpm import Tpm, TpmError

log = logging.getLogger(__name__)

# Application PCRs in the static range (not resettable at locality 0): 12 for the host's
# configuration, 13 for isovisor's code. docs/SECURITY.md says why not 16 or 23.
PLATFORM_PCR = 12
CODE_PCR = 13
KIND_INTEGRITY = SECURITY_INTEGRITY  # the audit record kinds (security.<kind>)
KIND_GATE = SECURITY_LAUNCH_GATE


class LaunchRefused(IntegrityError):  # noqa: N818 (a decision, not a fault)
    """A launch the gate refused: `kind` is the audit record kind, `path` the code file
    that differed (integrity failures), the message says which check failed."""

    def __init__(self, kind: str, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.path = path


@dataclass(frozen=True)
class GateConfig:
    manifest: Path
    release_key: Path
    policy: Path
    policy_key: Path
    event_log: Path
    code_root: Path | None = None  # None: the running isovisor package
    measure_root: Path = Path("/")  # tests point this at a directory of their own
    platform_pcr: int = PLATFORM_PCR
    code_pcr: int = CODE_PCR

    @property
    def pcrs(self) -> list[int]:
        return sorted({self.platform_pcr, self.code_pcr})


@dataclass(frozen=True)
class GateReport:
    manifest_digest: str
    pcrs: dict[int, str]
    events: int
    extended: list[str] = field(default_factory=list)


class LaunchGate:
    def __init__(self, config: GateConfig, tpm: Tpm) -> None:
        self.config = config
        self.tpm = tpm
        self.log_file = EventLogFile(config.event_log)
        self._lock = threading.Lock()

    def open(self) -> None:
        """Refuse resettable PCRs; make sure a log for this TPM boot exists."""
        if self.config.platform_pcr == self.config.code_pcr:
            raise IntegrityError("the platform and code PCRs must differ")
        resettable = self.tpm.resettable_pcrs() & set(self.config.pcrs)
        if resettable:
            raise IntegrityError(
                f"PCR {sorted(resettable)} can be reset from locality 0: measurements there "
                "prove nothing; choose PCRs in 8-15")
        with self.log_file.locked():
            self._current_log()

    def _current_log(self) -> EventLog:
        boot = self.tpm.boot_counts()
        existing = self.log_file.load()
        if existing is not None and existing.boot == boot and existing.pcrs == self.config.pcrs:
            return existing
        fresh = EventLog(boot, self.config.pcrs)
        self.log_file.save(fresh)
        if existing is not None:
            log.info("event log from TPM boot %s replaced for boot %s", existing.boot, boot)
        return fresh

    def _pcr(self, m: Measurement) -> int:
        return self.config.code_pcr if m.kind == CODE else self.config.platform_pcr

    def check(self) -> GateReport:
        """Raises LaunchRefused with the precise reason; returns what it checked."""
        with self._lock:
            try:
                with self.log_file.locked():
                    return self._measure_and_compare(self._verify_code())
            except LaunchRefused:
                raise
            except TpmError as exc:  # fail closed: no TPM, no launch
                raise LaunchRefused(KIND_GATE, f"TPM: {exc}") from exc
            except IntegrityError as exc:  # e.g. an unreadable or malformed event log
                raise LaunchRefused(KIND_GATE, f"measured launch: {exc}") from exc
            except OSError as exc:  # the event log cannot be written
                raise LaunchRefused(KIND_GATE, f"measured launch state: {exc}") from exc

    def _verify_code(self) -> Manifest:
        cfg = self.config
        try:
            return verify_manifest(cfg.manifest, load_public_key(cfg.release_key),
                                   cfg.code_root)
        except ManifestError as exc:
            raise LaunchRefused(KIND_INTEGRITY, f"VMM integrity: {exc}", exc.path) from exc
        except IntegrityError as exc:
            raise LaunchRefused(KIND_INTEGRITY, f"VMM integrity: {exc}") from exc

    def _measure_and_compare(self, manifest: Manifest) -> GateReport:
        cfg = self.config
        event_log = self._current_log()
        now = [*collect(cfg.measure_root), manifest_measurement(manifest.digest)]
        seen = {m.name for m in now}
        latest = event_log.latest()
        kinds = {ev.name: ev.pcr for ev in event_log.events}
        now += [Measurement(name, ABSENT,
                            CODE if kinds[name] == cfg.code_pcr else "platform")
                for name in latest if name not in seen]
        extended = []
        for m in now:
            if latest.get(m.name) == m.value:
                continue
            ev = Event(self._pcr(m), m.name, m.value)
            self.tpm.extend(ev.pcr, ev.digest)
            event_log.events.append(ev)
            self.log_file.save(event_log)  # after each extend: a crash leaves one behind
            extended.append(m.name)
        actual = self.tpm.read_pcrs(cfg.pcrs)
        expected = event_log.replay()
        for pcr in cfg.pcrs:
            if actual[pcr] != expected[pcr]:
                raise LaunchRefused(KIND_GATE, (
                    f"PCR {pcr} (SHA-256) is {actual[pcr].hex()} but the event log "
                    f"({len(event_log.events)} events) replays to {expected[pcr].hex()}: "
                    "the PCR was extended outside isovisor's event log, or the log was "
                    "altered"))
        try:
            policy = load_policy(cfg.policy, load_public_key(cfg.policy_key))
        except PolicyError as exc:
            raise LaunchRefused(KIND_GATE, f"launch policy: {exc}") from exc
        except IntegrityError as exc:
            raise LaunchRefused(KIND_GATE, f"launch policy: {exc}") from exc
        refusals = policy.check(event_log.events)
        if refusals:
            more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
            raise LaunchRefused(KIND_GATE, f"platform integrity: {refusals[0]}{more}")
        return GateReport(manifest.digest, {p: v.hex() for p, v in actual.items()},
                          len(event_log.events), extended)
