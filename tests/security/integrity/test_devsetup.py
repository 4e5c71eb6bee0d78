"""`make setup`'s integrity step (`isovisor integrity dev-setup`): development keys made
once and owner-only, a manifest rebuilt only when the code changed, a policy re-signed only
when it no longer accepts the host, and an isovisord config whose gate passes with them
(a real swtpm started by HostIntegrity)."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest

from isovisor.cli.main import main
from isovisor.host.integrity import HostIntegrity, IntegritySettings
from isovisor.security.audit.hooks import HostAudit
from isovisor.security.integrity.devsetup import DevIntegrity, dev_setup
from isovisor.security.integrity.errors import IntegrityError
from isovisor.security.integrity.manifest import verify_manifest
from isovisor.security.integrity.signing import load_public_key
from tests.security.integrity.integrity_setup import code_tree, fake_host_root


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_dev_setup_makes_keys_once_and_signs_what_runs(tmp_path: Path) -> None:
    code = code_tree(tmp_path / "code" / "pkg")
    root = fake_host_root(tmp_path / "hostroot")
    d = tmp_path / "dev"
    first = dev_setup(d, code, root)
    files = DevIntegrity(d.resolve())
    assert files.missing() == []
    assert _mode(d) == 0o700
    assert _mode(files.release_key) == 0o600 and _mode(files.policy_key) == 0o600
    keys = files.release_key.read_bytes(), files.policy_key.read_bytes()
    m = verify_manifest(files.manifest, load_public_key(files.release_pub), code)
    assert m.digest == first.manifest_digest and str(code / "mod1.py") in m.files

    # Nothing changed: keys, manifest and policy stay as they are.
    manifest, policy = files.manifest.read_bytes(), files.policy.read_bytes()
    again = dev_setup(d, code, root)
    assert (files.release_key.read_bytes(), files.policy_key.read_bytes()) == keys
    assert files.manifest.read_bytes() == manifest and files.policy.read_bytes() == policy
    assert any("manifest.json: up to date" in line for line in again.lines)

    # A code file changed: the manifest is rebuilt (naming the file), the policy re-signed
    # for the new digest; the keys are still the same.
    (code / "mod1.py").write_text("VALUE = 'changed'\n")
    third = dev_setup(d, code, root)
    assert third.manifest_digest != first.manifest_digest
    assert any(f"rebuilt (code file {code / 'mod1.py'} was modified" in line
               for line in third.lines)
    assert any("policy.json: re-signed" in line and "isovisor.manifest" in line
               for line in third.lines)
    assert (files.release_key.read_bytes(), files.policy_key.read_bytes()) == keys


def test_dev_setup_refuses_a_signing_key_others_can_read(tmp_path: Path) -> None:
    code = code_tree(tmp_path / "code" / "pkg")
    d = tmp_path / "dev"
    dev_setup(d, code, fake_host_root(tmp_path / "hostroot"))
    (d / "release-key").chmod(0o644)
    with pytest.raises(IntegrityError, match=r"release-key is mode 0644.*must be 0600"):
        dev_setup(d, code, tmp_path / "hostroot")


def test_the_daemon_config_it_writes_passes_the_gate(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = code_tree(tmp_path / "code" / "pkg")
    root = fake_host_root(tmp_path / "hostroot")
    d = tmp_path / "dev"
    assert main(["integrity", "dev-setup", "--dir", str(d), "--code-root", str(code),
                 "--measure-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "release-key: new development Ed25519 key" in out and "isovisord.toml" in out
    table = tomllib.loads((d / "isovisord.toml").read_text())["integrity"]
    table.update(code_root=str(code), measure_root=str(root), tpm="swtpm")
    audit = HostAudit(tmp_path / "state")
    integrity = HostIntegrity(IntegritySettings.from_table(table), tmp_path / "state",
                              audit.log)
    try:
        report = integrity.open()
        assert report is not None and sorted(report.pcrs) == [12, 13]
        assert "launch gate ON, passed at start" in integrity.summary()
    finally:
        integrity.close()
        audit.close()
