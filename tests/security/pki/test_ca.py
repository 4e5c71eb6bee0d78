"""The host CA: init, issue, revoke, CRL, and the daemon's fail-closed view of the CRL."""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from isovisor.security.pki import (
    CaExistsError,
    CaMissingError,
    CertificateAuthority,
    PkiError,
    RevocationList,
    UnknownCertificateError,
)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca"))


def test_init_writes_private_key_0600_and_refuses_overwrite(ca: CertificateAuthority) -> None:
    assert stat.S_IMODE(os.stat(ca.directory / "ca.key").st_mode) == 0o600
    with pytest.raises(CaExistsError):
        CertificateAuthority.init(ca.directory)
    assert CertificateAuthority.load(ca.directory).cert == ca.cert


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(CaMissingError, match="ca init"):
        CertificateAuthority.load(tmp_path)


def test_issue_client_and_server(ca: CertificateAuthority) -> None:
    client = ca.issue("alice@a")
    cert = x509.load_pem_x509_certificate(client.cert_pem)
    assert cert.subject.rfc4514_string() == "CN=alice@a"
    assert cert.serial_number == client.serial
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku
    server = ca.issue("isovisord", server=True, dns_names=["localhost"],
                      ip_addresses=["127.0.0.1"])
    scert = x509.load_pem_x509_certificate(server.cert_pem)
    san = scert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert cert.verify_directly_issued_by(ca.cert) is None
    assert any(r.serial == client.serial for r in ca.issued())


@pytest.mark.parametrize("bad", ["", "-x", "a b", "x" * 65, "a/b", "é"])
def test_issue_rejects_bad_names(ca: CertificateAuthority, bad: str) -> None:
    with pytest.raises(PkiError):
        ca.issue(bad)


def test_revoke_updates_crl_and_revocation_list(ca: CertificateAuthority) -> None:
    rl = RevocationList(ca.crl_path, ca.cert)
    bob = ca.issue("bob")
    assert not rl.is_revoked(bob.serial)
    revoked = ca.revoke(str(bob.serial))
    assert [r.serial for r in revoked] == [bob.serial]
    assert rl.is_revoked(bob.serial)
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(bob.serial) is not None
    with pytest.raises(UnknownCertificateError):
        ca.revoke(str(bob.serial))


def test_revoke_by_name_and_crl_last_update_moves(ca: CertificateAuthority) -> None:
    before = x509.load_pem_x509_crl(ca.crl_path.read_bytes()).last_update_utc
    c1, c2 = ca.issue("carol"), ca.issue("carol")
    assert {r.serial for r in ca.revoke("carol")} == {c1.serial, c2.serial}
    after = x509.load_pem_x509_crl(ca.crl_path.read_bytes()).last_update_utc
    assert after > before


def test_revocation_list_fails_closed(ca: CertificateAuthority, tmp_path: Path) -> None:
    forged_ca = CertificateAuthority.init(tmp_path / "other")
    rl = RevocationList(forged_ca.crl_path, ca.cert)  # CRL signed by the wrong CA
    assert rl.is_revoked(1) and rl.error is not None and "not signed" in rl.error
    missing = RevocationList(tmp_path / "nope.pem", ca.cert)
    assert missing.is_revoked(1)


def test_short_validity_and_backdating(ca: CertificateAuthority) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    old = ca.issue("expired", not_before=start, validity=dt.timedelta(days=1))
    cert = x509.load_pem_x509_certificate(old.cert_pem)
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)


def test_crl_is_never_dated_in_the_future(tmp_path: Path) -> None:
    """A CRL not yet valid would fail every handshake: init and re-sign in one second."""
    ca = CertificateAuthority.init(tmp_path / "ca")
    for _ in range(3):
        ca.refresh_crl()
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.last_update_utc <= dt.datetime.now(dt.UTC)
