"""The host certificate authority: one ECDSA P-256 CA per host, client and server
certificates, revocation and a signed CRL.

Layout of a CA directory (the daemon's `ca/`):

    ca.key      CA private key (0600)
    ca.crt      CA certificate (PEM)
    crl.pem     certificate revocation list, re-signed on every revocation
    index.json  every certificate issued: serial, name, kind, validity, revocation
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from isovisor.security.pki.errors import (
    CaExistsError,
    CaMissingError,
    PkiError,
    UnknownCertificateError,
)
from isovisor.security.pki.files import PRIVATE_MODE, PUBLIC_MODE, locked, write_atomic

CA_VALIDITY = dt.timedelta(days=3650)
CERT_VALIDITY = dt.timedelta(days=365)
# A CRL past its nextUpdate fails every handshake (OpenSSL: "CRL has expired"); the
# daemon re-signs it at start and daily, so a week leaves ample margin.
CRL_VALIDITY = dt.timedelta(days=7)
# Clock skew between hosts and clients: certificates are valid from a little before now.
BACKDATE = dt.timedelta(minutes=5)

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CRL = "crl.pem"
INDEX = "index.json"

# Principal names are certificate common names and appear in scopes, logs and tables.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise PkiError(
            f"{name!r} is not a valid principal name (letters, digits, '.', '_', '@', '-'; "
            "at most 64 characters, starting with a letter or digit)"
        )
    return name


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class IssuedRecord:
    """One line of the CA's index."""

    serial: int
    name: str
    kind: str  # "client" or "server"
    not_before: str
    not_after: str
    revoked_at: str | None = None


@dataclass(frozen=True)
class IssuedCertificate:
    serial: int
    name: str
    key_pem: bytes
    cert_pem: bytes


class CertificateAuthority:
    """A CA loaded from its directory. Methods that change it hold the directory lock."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey,
                 cert: x509.Certificate) -> None:
        self.directory = directory
        self._key = key
        self.cert = cert

    # -- creation and loading -------------------------------------------------------

    @classmethod
    def init(cls, directory: Path, common_name: str = "isovisor host CA") -> CertificateAuthority:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        with locked(directory):
            if (directory / CA_KEY).exists() or (directory / CA_CERT).exists():
                raise CaExistsError(f"{directory} already holds a CA; refusing to overwrite it")
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
            now = _now()
            cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE)
                .not_valid_after(now + CA_VALIDITY)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=False, content_commitment=False,
                        key_encipherment=False, data_encipherment=False, key_agreement=False,
                        key_cert_sign=True, crl_sign=True, encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                               critical=False)
                .sign(key, hashes.SHA256())
            )
            write_atomic(directory / CA_KEY, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), PRIVATE_MODE)
            write_atomic(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM),
                         PUBLIC_MODE)
            ca = cls(directory, key, cert)
            ca._write_index([])
            ca._write_crl([])
            return ca

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        try:
            key_pem = (directory / CA_KEY).read_bytes()
            cert_pem = (directory / CA_CERT).read_bytes()
        except FileNotFoundError:
            raise CaMissingError(
                f"no CA in {directory}: run `isovisor ca init --dir {directory}`") from None
        except PermissionError as exc:
            raise PkiError(f"cannot read the CA in {directory}: {exc.strerror}") from exc
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{directory / CA_KEY} is not an EC private key")
        return cls(directory, key, x509.load_pem_x509_certificate(cert_pem))

    @classmethod
    def load_or_init(cls, directory: Path) -> CertificateAuthority:
        if (directory / CA_CERT).exists():
            return cls.load(directory)
        return cls.init(directory)

    # -- issuing ----------------------------------------------------------------------

    def issue(
        self,
        name: str,
        *,
        server: bool = False,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        validity: dt.timedelta = CERT_VALIDITY,
        not_before: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """A new key and a certificate for `name` (client: clientAuth; server: serverAuth)."""
        check_name(name)
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before if not_before is not None else _now() - BACKDATE
        end = start + validity
        if end > self.cert.not_valid_after_utc:
            end = self.cert.not_valid_after_utc
        serial = x509.random_serial_number()
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=True, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        try:
            sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        except ValueError as exc:
            raise PkiError(f"bad IP address for the certificate: {exc}") from exc
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        record = IssuedRecord(serial=serial, name=name, kind="server" if server else "client",
                              not_before=start.isoformat(), not_after=end.isoformat())
        with locked(self.directory):
            self._write_index([*self.issued(), record])
        return IssuedCertificate(
            serial=serial, name=name,
            key_pem=key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()),
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        )

    # -- revocation ---------------------------------------------------------------------

    def revoke(self, which: str) -> list[IssuedRecord]:
        """Revoke by serial number (decimal or 0x-hex) or by name (every unrevoked
        certificate of that name). Re-signs the CRL; returns what was revoked."""
        with locked(self.directory):
            records = self.issued()
            serial = _parse_serial(which)
            hits = [r for r in records if r.revoked_at is None
                    and (r.serial == serial or r.name == which)]
            if not hits:
                raise UnknownCertificateError(
                    f"no unrevoked certificate with serial or name {which!r} in {self.directory}")
            when = _now().isoformat()
            hit_serials = {r.serial for r in hits}
            updated = [
                IssuedRecord(**{**asdict(r), "revoked_at": when}) if r.serial in hit_serials
                else r for r in records
            ]
            self._write_index(updated)
            self._write_crl(updated)
        return [r for r in updated if r.serial in hit_serials]

    def refresh_crl(self) -> None:
        """Re-sign the CRL with a fresh validity window (the daemon does this daily)."""
        with locked(self.directory):
            self._write_crl(self.issued())

    def issued(self) -> list[IssuedRecord]:
        try:
            raw = json.loads((self.directory / INDEX).read_text())
        except FileNotFoundError:
            return []
        return [IssuedRecord(**r) for r in raw]

    @property
    def cert_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def crl_path(self) -> Path:
        return self.directory / CRL

    def _write_index(self, records: Sequence[IssuedRecord]) -> None:
        data = json.dumps([asdict(r) for r in records], indent=1).encode()
        write_atomic(self.directory / INDEX, data, PRIVATE_MODE)

    def _write_crl(self, records: Sequence[IssuedRecord]) -> None:
        now = _now()
        # lastUpdate must move forward on every re-signing (OpenSSL prefers the CRL with
        # the latest lastUpdate when a context holds several; it counts whole seconds) and
        # must never be in the future (a CRL not yet valid fails every handshake). Backdated
        # like certificates, it can advance a second per re-signing and stay in the past.
        previous = self._crl_last_update()
        last = (now - BACKDATE).replace(microsecond=0)
        if previous is not None and last <= previous:
            last = previous + dt.timedelta(seconds=1)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(last)
            .next_update(last + CRL_VALIDITY)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .add_extension(x509.CRLNumber(secrets.randbits(63)), critical=False)
        )
        for r in records:
            if r.revoked_at is None:
                continue
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(r.serial)
                .revocation_date(dt.datetime.fromisoformat(r.revoked_at))
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        write_atomic(self.directory / CRL, crl.public_bytes(serialization.Encoding.PEM),
                     PUBLIC_MODE)

    def _crl_last_update(self) -> dt.datetime | None:
        try:
            crl = x509.load_pem_x509_crl((self.directory / CRL).read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return crl.last_update_utc


def _parse_serial(text: str) -> int | None:
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text)
    except ValueError:
        return None
