"""The TPM layer against a real swtpm: SHA-256 extends land where the spec says, PCR 16
and 23 are the resettable ones (so the gate refuses them), the attestation key is the
same after a restart, a restart resets the PCRs and counts a TPM reset, and failures are
one sentence naming the TPM."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from isovisor.security.tpm import Swtpm, Tpm, TpmAddress, TpmError


def test_extend_follows_the_spec(tpm: Tpm) -> None:
    assert tpm.read_pcrs([12, 13]) == {12: bytes(32), 13: bytes(32)}
    d1, d2 = hashlib.sha256(b"one").digest(), hashlib.sha256(b"two").digest()
    tpm.extend(12, d1)
    tpm.extend(12, d2)
    want = hashlib.sha256(hashlib.sha256(bytes(32) + d1).digest() + d2).digest()
    assert tpm.read_pcrs([12, 13]) == {12: want, 13: bytes(32)}


def test_locality0_resettable_pcrs(tpm: Tpm) -> None:
    assert tpm.resettable_pcrs() == {16, 23}


def test_restart_resets_pcrs_keeps_the_ak(tmp_path: Path) -> None:
    state = tmp_path / "tpm"
    with Swtpm(state) as sw:
        tpm = Tpm(TpmAddress.swtpm(sw.socket_path))
        ak = tpm.attestation_key_pem()
        tpm.extend(13, hashlib.sha256(b"x").digest())
        boot = tpm.boot_counts()
    with Swtpm(state) as sw:
        tpm = Tpm(TpmAddress.swtpm(sw.socket_path))
        assert tpm.read_pcrs([13]) == {13: bytes(32)}
        assert tpm.boot_counts()[0] == boot[0] + 1
        assert tpm.attestation_key_pem() == ak
        assert ak.startswith(b"-----BEGIN PUBLIC KEY-----")


def test_quote_carries_the_qualifying_data(tpm: Tpm) -> None:
    from tpm2_pytss.types import TPMS_ATTEST

    q = tpm.quote([12, 13], b"q" * 32)
    attest, _ = TPMS_ATTEST.unmarshal(q.attest)
    assert bytes(attest.extraData) == b"q" * 32
    with pytest.raises(TpmError, match="at most 32"):
        tpm.quote([12], b"x" * 33)


def test_bad_arguments_and_unreachable_tpm(tpm: Tpm, tmp_path: Path) -> None:
    with pytest.raises(TpmError, match="PCR 24 does not exist"):
        tpm.read_pcrs([24])
    with pytest.raises(TpmError, match="needs 32 bytes"):
        tpm.extend(12, b"short")
    gone = Tpm(TpmAddress.swtpm(tmp_path / "nothing.sock"))
    with pytest.raises(TpmError, match=r"cannot reach the TPM at swtpm:path=.*nothing.sock"):
        gone.read_pcrs([12])


def test_swtpm_missing_binary_is_named(tmp_path: Path) -> None:
    with pytest.raises(TpmError, match="swtpm is not installed"):
        Swtpm(tmp_path / "t", binary="no-such-swtpm").start()
