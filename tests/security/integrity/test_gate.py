"""The launch gate against a real swtpm: each attack blocks the launch with a reason that
names what differed; the good path passes and is idempotent."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from isovisor.security.integrity.errors import IntegrityError
from isovisor.security.integrity.eventlog import EventLogFile
from isovisor.security.integrity.gate import (
    KIND_GATE,
    KIND_INTEGRITY,
    GateConfig,
    LaunchGate,
    LaunchRefused,
)
from isovisor.security.tpm import Tpm
from tests.security.integrity.integrity_setup import IntegrityFiles, make_integrity_files


@pytest.fixture
def files(tmp_path: Path) -> IntegrityFiles:
    return make_integrity_files(tmp_path / "integrity")


@pytest.fixture
def gate(files: IntegrityFiles, tpm: Tpm, tmp_path: Path) -> LaunchGate:
    g = LaunchGate(files.gate_config(tmp_path / "state" / "eventlog.json"), tpm)
    g.open()
    return g


def refused(gate: LaunchGate) -> LaunchRefused:
    with pytest.raises(LaunchRefused) as info:
        gate.check()
    return info.value


def test_good_host_passes_and_matches_the_tpm(gate: LaunchGate, tpm: Tpm) -> None:
    first = gate.check()
    assert "kernel.cmdline" in first.extended and "isovisor.manifest" in first.extended
    assert first.pcrs[12] != "00" * 32 and first.pcrs[13] != "00" * 32
    again = gate.check()  # nothing changed: nothing extended, same PCRs
    assert again.extended == [] and again.pcrs == first.pcrs
    replayed = EventLogFile(gate.config.event_log).load()
    assert replayed is not None
    assert {p: v.hex() for p, v in replayed.replay().items()} == {
        p: v.hex() for p, v in tpm.read_pcrs([12, 13]).items()}


def test_tampered_code_file_is_named(gate: LaunchGate, files: IntegrityFiles) -> None:
    gate.check()
    target = files.code_root / "mod1.py"
    target.write_text("VALUE = 'evil'\n")
    why = refused(gate)
    assert why.kind == KIND_INTEGRITY and why.path == str(target)
    assert f"code file {target} was modified" in why.message


def test_added_code_file_is_named(gate: LaunchGate, files: IntegrityFiles) -> None:
    extra = files.code_root / "backdoor.py"
    extra.write_text("import os\n")
    why = refused(gate)
    assert why.kind == KIND_INTEGRITY and why.path == str(extra)
    assert "not in the signed manifest" in why.message


def test_manifest_not_signed_by_the_release_key(gate: LaunchGate, files: IntegrityFiles) -> None:
    doc = json.loads(files.manifest.read_text())
    doc["document"]["files"][str(files.code_root / "mod0.py")] = "0" * 64
    files.manifest.write_text(json.dumps(doc))
    why = refused(gate)
    assert why.kind == KIND_INTEGRITY and "changed after signing" in why.message


def test_tampered_policy_is_refused(gate: LaunchGate, files: IntegrityFiles) -> None:
    gate.check()
    doc = json.loads(files.policy.read_text())
    doc["document"]["accept"]["kernel.randomize_va_space"] = ["0", "1", "2"]  # widen it
    files.policy.write_text(json.dumps(doc))
    why = refused(gate)
    assert why.kind == KIND_GATE
    assert f"launch policy: the policy {files.policy} does not match its signature" in \
        why.message


def test_unexpected_kernel_parameter_is_named(gate: LaunchGate, files: IntegrityFiles) -> None:
    gate.check()
    (files.measure_root / "sys/module/kvm/parameters/nx_huge_pages").write_text("auto\n")
    why = refused(gate)
    assert why.kind == KIND_GATE
    assert "measurement kvm.kvm.nx_huge_pages (PCR 12" in why.message
    assert "'auto' is not accepted by the policy (accepted: 'never')" in why.message
    # Putting it back does not forget: the bad value was measured in this TPM boot.
    (files.measure_root / "sys/module/kvm/parameters/nx_huge_pages").write_text("never\n")
    assert "kvm.kvm.nx_huge_pages" in refused(gate).message


def test_unknown_measurement_is_not_covered(gate: LaunchGate, files: IntegrityFiles) -> None:
    vuln = files.measure_root / "sys/devices/system/cpu/vulnerabilities/new_bug"
    vuln.write_text("Vulnerable\n")
    why = refused(gate)
    assert "measurement cpu.vulnerability.new_bug" in why.message
    assert "is not covered by the policy" in why.message


def test_aslr_off_is_refused(gate: LaunchGate, files: IntegrityFiles) -> None:
    (files.measure_root / "proc/sys/kernel/randomize_va_space").write_text("0\n")
    assert "measurement kernel.randomize_va_space" in refused(gate).message


def test_pcr_extended_out_of_band(gate: LaunchGate, tpm: Tpm) -> None:
    gate.check()
    tpm.extend(12, hashlib.sha256(b"something isovisor never logged").digest())
    why = refused(gate)
    assert why.kind == KIND_GATE
    assert why.message.startswith("PCR 12 (SHA-256) is ")
    assert "extended outside isovisor's event log" in why.message


def test_event_log_edited_to_hide_a_value(gate: LaunchGate, files: IntegrityFiles) -> None:
    (files.measure_root / "proc/sys/kernel/randomize_va_space").write_text("0\n")
    refused(gate)
    path = gate.config.event_log
    doc = json.loads(path.read_text())
    doc["events"] = [e for e in doc["events"]
                     if not (e["name"] == "kernel.randomize_va_space" and e["value"] == "0")]
    path.write_text(json.dumps(doc))
    (files.measure_root / "proc/sys/kernel/randomize_va_space").write_text("2\n")
    assert "PCR 12 (SHA-256)" in refused(gate).message


def test_resettable_pcrs_are_refused(files: IntegrityFiles, tpm: Tpm, tmp_path: Path) -> None:
    cfg = files.gate_config(tmp_path / "log.json")
    bad = GateConfig(**{**cfg.__dict__, "platform_pcr": 16})
    with pytest.raises(IntegrityError, match=r"PCR \[16\] can be reset from locality 0"):
        LaunchGate(bad, tpm).open()


def test_restarted_daemon_continues_the_log_of_this_tpm_boot(
        gate: LaunchGate, tpm: Tpm) -> None:
    first = gate.check()
    again = LaunchGate(gate.config, tpm)  # a daemon restart; the TPM did not reset
    again.open()
    report = again.check()
    assert report.extended == [] and report.pcrs == first.pcrs


def test_lost_event_log_refuses_until_the_tpm_resets(gate: LaunchGate, tpm: Tpm) -> None:
    gate.check()
    gate.config.event_log.unlink()  # an attacker (or an accident) removes the record
    why = refused(gate)
    assert "PCR 12 (SHA-256)" in why.message and "replays to" in why.message


def test_corrupt_event_log_refuses_cleanly(gate: LaunchGate) -> None:
    gate.check()
    gate.config.event_log.write_text('{"schema": 1, "boot": "x"')
    why = refused(gate)
    assert why.kind == KIND_GATE and why.message.startswith("measured launch: the event log")


def test_unreachable_tpm_refuses(files: IntegrityFiles, tmp_path: Path) -> None:
    from isovisor.security.tpm import Swtpm, TpmAddress

    with Swtpm(tmp_path / "tpm2") as sw:
        g = LaunchGate(files.gate_config(tmp_path / "log2.json"),
                       Tpm(TpmAddress.swtpm(sw.socket_path)))
        g.open()
        g.check()
    why = refused(g)  # swtpm is gone
    assert why.message.startswith("TPM: cannot reach the TPM")
