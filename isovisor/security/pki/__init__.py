"""The host certificate authority (cryptography library): CA init, certificate issue,
revocation, CRL; and the daemon's view of the CRL."""

from isovisor.security.pki.ca import (
    CertificateAuthority,
    IssuedCertificate,
    IssuedRecord,
    check_name,
)
from isovisor.security.pki.errors import (
    CaExistsError,
    CaMissingError,
    PkiError,
    UnknownCertificateError,
)
from isovisor.security.pki.revocation import RevocationList

__all__ = [
    "CaExistsError",
    "CaMissingError",
    "CertificateAuthority",
    "IssuedCertificate",
    "IssuedRecord",
    "PkiError",
    "RevocationList",
    "UnknownCertificateError",
    "check_name",
]
