"""Quotes from a real swtpm and their offline verification: the good path verifies; a
wrong nonce, a replayed quote, a stale nonce, an altered event log, another TPM's key,
another boot's log and a value outside the policy are each rejected by name."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from isovisor.security.integrity.attestation import (
    AttestationError,
    issue_nonce,
    make_bundle,
    verify_bundle,
)
from isovisor.security.integrity.gate import LaunchGate
from isovisor.security.integrity.policy import Policy, load_policy
from isovisor.security.integrity.signing import load_public_key
from isovisor.security.tpm import Swtpm, Tpm, TpmAddress
from tests.security.integrity.integrity_setup import IntegrityFiles, make_integrity_files


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> IntegrityFiles:
    """Shared by the module's tests, which only read them (each has its own swtpm)."""
    return make_integrity_files(tmp_path_factory.mktemp("integrity"))


@pytest.fixture
def gate(files: IntegrityFiles, tpm: Tpm, tmp_path: Path) -> LaunchGate:
    g = LaunchGate(files.gate_config(tmp_path / "state" / "eventlog.json"), tpm)
    g.open()
    g.check()
    return g


@pytest.fixture
def policy(files: IntegrityFiles) -> Policy:
    return load_policy(files.policy, load_public_key(files.policy_pub))


def _quote(gate: LaunchGate, nonce: str) -> dict[str, Any]:
    return make_bundle(gate.tpm, gate.log_file, nonce)


def _verify(bundle: dict[str, Any], nonce: str, tpm: Tpm, policy: Policy,
            **kw: Any) -> Any:
    return verify_bundle(bundle, expected_nonce=nonce, ak_pem=tpm.attestation_key_pem(),
                         policy=policy, **kw)


def test_good_quote_verifies(gate: LaunchGate, tpm: Tpm, policy: Policy) -> None:
    nonce = issue_nonce()
    v = _verify(_quote(gate, nonce), nonce, tpm, policy)
    assert v.nonce == nonce and v.events >= 20 and set(v.pcrs) == {12, 13}
    assert v.pcrs == {p: x.hex() for p, x in tpm.read_pcrs([12, 13]).items()}


def test_wrong_nonce_is_rejected(gate: LaunchGate, tpm: Tpm, policy: Policy) -> None:
    bundle = _quote(gate, issue_nonce())
    with pytest.raises(AttestationError, match="made for another nonce"):
        _verify(bundle, issue_nonce(), tpm, policy)


def test_replayed_quote_is_rejected(gate: LaunchGate, tpm: Tpm, policy: Policy) -> None:
    """An attacker keeps yesterday's good quote and answers today's challenge with it."""
    old_nonce = issue_nonce()
    old = _quote(gate, old_nonce)
    _verify(old, old_nonce, tpm, policy)  # it was good for its own challenge
    replay = copy.deepcopy(old)
    replay["nonce"] = fresh = issue_nonce()  # the claimed nonce is not what is signed
    with pytest.raises(AttestationError, match="made for another nonce"):
        _verify(replay, fresh, tpm, policy)


def test_stale_nonce_is_rejected(gate: LaunchGate, tpm: Tpm, policy: Policy) -> None:
    import time
    nonce = issue_nonce(now=time.time() - 3600)
    bundle = _quote(gate, nonce)
    with pytest.raises(AttestationError, match=r"stale quote: its nonce was issued 36\d\d s"):
        _verify(bundle, nonce, tpm, policy, max_age=300)
    _verify(bundle, nonce, tpm, policy, max_age=7200)  # the same quote within its age


def test_nonce_without_issue_time_is_rejected(gate: LaunchGate, tpm: Tpm,
                                              policy: Policy) -> None:
    bundle = _quote(gate, "123")
    with pytest.raises(AttestationError, match="carries no issue time"):
        _verify(bundle, "123", tpm, policy)


def test_altered_event_log_is_rejected(gate: LaunchGate, tpm: Tpm, policy: Policy) -> None:
    nonce = issue_nonce()
    bundle = _quote(gate, nonce)
    events = bundle["event_log"]["events"]
    victim = next(e for e in events if e["name"] == "kernel.randomize_va_space")
    victim["value"] = "0" if victim["value"] != "0" else "2"
    with pytest.raises(AttestationError, match="does not replay to the PCRs the TPM signed"):
        _verify(bundle, nonce, tpm, policy)


def test_log_of_another_boot_is_rejected(gate: LaunchGate, tpm: Tpm, policy: Policy) -> None:
    nonce = issue_nonce()
    bundle = _quote(gate, nonce)
    bundle["event_log"]["boot"][0] += 1
    with pytest.raises(AttestationError, match="belongs to TPM boot"):
        _verify(bundle, nonce, tpm, policy)


def test_another_tpms_key_is_rejected(gate: LaunchGate, policy: Policy, tmp_path: Path) -> None:
    nonce = issue_nonce()
    bundle = _quote(gate, nonce)
    with (Swtpm(tmp_path / "other-tpm") as other,
          pytest.raises(AttestationError, match="does not verify with the pinned")):
        _verify(bundle, nonce, Tpm(TpmAddress.swtpm(other.socket_path)), policy)


def test_altered_quote_bytes_are_rejected(gate: LaunchGate, tpm: Tpm, policy: Policy) -> None:
    import base64
    nonce = issue_nonce()
    bundle = _quote(gate, nonce)
    raw = bytearray(base64.b64decode(bundle["quote"]))
    raw[-1] ^= 1  # one bit of the PCR digest
    bundle["quote"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(AttestationError, match="does not verify with the pinned"):
        _verify(bundle, nonce, tpm, policy)


def test_value_outside_policy_is_rejected(tpm: Tpm, tmp_path: Path) -> None:
    files = make_integrity_files(tmp_path / "own")  # this test changes the host root
    policy = load_policy(files.policy, load_public_key(files.policy_pub))
    gate = LaunchGate(files.gate_config(tmp_path / "state" / "eventlog.json"), tpm)
    gate.open()
    gate.check()
    (files.measure_root / "proc/sys/kernel/randomize_va_space").write_text("1\n")
    with pytest.raises(Exception, match="randomize_va_space"):
        gate.check()  # measured (extended and logged), and refused
    nonce = issue_nonce()
    bundle = _quote(gate, nonce)
    with pytest.raises(AttestationError,
                       match=r"policy: measurement kernel.randomize_va_space .* = '1'"):
        _verify(bundle, nonce, tpm, policy)


def test_garbage_bundles_fail_cleanly(gate: LaunchGate, tpm: Tpm, policy: Policy) -> None:
    nonce = issue_nonce()
    good = _quote(gate, nonce)
    cases: list[dict[str, Any]] = [
        {**good, "quote": "not base64!"}, {**good, "signature": ""},
        {**good, "signature": "AAAA"}, {**good, "event_log": {"schema": 1}},
        {**good, "event_log": json.loads('{"schema":1,"boot":[1,0],"pcrs":[12,13],'
                                         '"events":[{"pcr":99,"name":"x","value":"y"}]}')},
        {k: v for k, v in good.items() if k != "quote"},
    ]
    for bad in cases:
        with pytest.raises(AttestationError):
            _verify(bad, nonce, tpm, policy)
