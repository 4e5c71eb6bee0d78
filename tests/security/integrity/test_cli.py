"""The install and attestation commands as an operator runs them: `isovisor integrity`
builds and verifies the signed manifest and policy; `isovisor attest` quotes the measured
launch of a running HostIntegrity (real swtpm) and `attest verify` checks it offline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.cli.main import main
from isovisor.host.integrity import HostIntegrity, IntegritySettings
from isovisor.security.audit.hooks import HostAudit
from tests.security.integrity.integrity_setup import code_tree, fake_host_root


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def installed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    d = tmp_path / "etc"
    d.mkdir()
    code = code_tree(tmp_path / "code" / "pkg")
    root = fake_host_root(tmp_path / "hostroot")
    for key in ("release", "policy"):
        assert run(capsys, "integrity", "keygen", "--out", str(d / f"{key}.key"))[0] == 0
    assert run(capsys, "integrity", "manifest", "build", "--key", str(d / "release.key"),
               "--out", str(d / "manifest.json"), "--code-root", str(code))[0] == 0
    c, out, _ = run(capsys, "integrity", "policy", "build", "--key", str(d / "policy.key"),
                    "--out", str(d / "policy.json"), "--manifest", str(d / "manifest.json"),
                    "--release-key", str(d / "release.pub"), "--measure-root", str(root))
    assert c == 0 and "current measurements" in out
    return {"dir": d, "code": code, "root": root}


def test_manifest_verify_names_a_changed_file(installed: dict[str, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    d, code = installed["dir"], installed["code"]
    args = ("integrity", "manifest", "verify", "--manifest", str(d / "manifest.json"),
            "--release-key", str(d / "release.pub"), "--code-root", str(code))
    c, out, _ = run(capsys, *args)
    assert c == 0 and "files verify" in out
    (code / "mod0.py").write_text("VALUE = 'changed'\n")
    c, _, err = run(capsys, *args)
    assert c == 1 and f"code file {code / 'mod0.py'} was modified" in err


@pytest.fixture
def daemon_integrity(installed: dict[str, Path], tmp_path: Path) -> Iterator[Path]:
    d = installed["dir"]
    settings = IntegritySettings.from_table({
        "manifest": str(d / "manifest.json"), "release_key": str(d / "release.pub"),
        "policy": str(d / "policy.json"), "policy_key": str(d / "policy.pub"),
        "code_root": str(installed["code"]), "measure_root": str(installed["root"]),
        "tpm": "swtpm"})
    state = tmp_path / "state"
    audit = HostAudit(state)
    integrity = HostIntegrity(settings, state, audit.log)
    assert integrity.open() is not None  # the first measurement passed the gate
    try:
        yield state
    finally:
        integrity.close()
        audit.close()


def test_attest_and_verify_offline(daemon_integrity: Path, installed: dict[str, Path],
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, d = daemon_integrity, installed["dir"]
    c, nonce, _ = run(capsys, "attest", "nonce")
    nonce = nonce.strip()
    assert c == 0 and len(nonce.split(".")[1]) == 32
    bundle, ak = tmp_path / "quote.json", tmp_path / "ak.pem"
    assert run(capsys, "attest", "--nonce", nonce, "--state-dir", str(state),
               "--out", str(bundle))[0] == 0
    assert run(capsys, "attest", "key", "--state-dir", str(state), "--out", str(ak))[0] == 0
    verify = ("attest", "verify", "--bundle", str(bundle), "--ak", str(ak),
              "--policy", str(d / "policy.json"), "--policy-key", str(d / "policy.pub"))
    c, out, err = run(capsys, *verify, "--nonce", nonce)
    assert c == 0, err
    assert out.startswith(f"verified: quote for nonce {nonce}")
    _, other, _ = run(capsys, "attest", "nonce")
    c, _, err = run(capsys, *verify, "--nonce", other.strip())
    assert c == 1 and "made for another nonce" in err


def test_attest_without_a_daemon_says_so(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    c, _, err = run(capsys, "attest", "--nonce", "1.x", "--state-dir", str(tmp_path))
    assert c == 1 and "is isovisord running with its [integrity] table?" in err
