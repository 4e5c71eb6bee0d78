"""The host PKI's parsers: a client certificate's DER as the TLS layer hands it to the
pipeline (peer_from_der: the principal's name comes from here), and the CRL file the
daemon reloads (fail closed). Seeds: certificates and a CRL from a real host CA."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

from cryptography import x509

from fuzz.data import Data
from isovisor.api.tls import peer_from_der

COVERS = ("host:api-listener", "host:state/ca", "host:state/tls", "host:state/admin",
          "host:state/keys")
_state: dict[str, Any] = {}


def setup() -> None:
    from isovisor.security.pki import CertificateAuthority, RevocationList

    tmp = tempfile.TemporaryDirectory(prefix="isovisor-fuzz-pki-")
    ca = CertificateAuthority.init(Path(tmp.name) / "ca")
    crl = Path(tmp.name) / "crl.pem"
    ca_cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    _state.update(tmp=tmp, crl=crl, revocations=RevocationList(crl, ca_cert))


def one_input(data: bytes) -> None:
    if not _state:
        setup()
    d = Data(data)
    if d.u8() & 1:
        # Only certificates the host CA signed get here in production (OpenSSL verified
        # the chain first), so oddities cryptography merely warns about are no finding.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                peer = peer_from_der(d.rest(), "127.0.0.1:1")
            except ValueError:
                return
        assert isinstance(peer.name, str) and isinstance(peer.serial, int)
        return
    crl: Path = _state["crl"]
    crl.write_bytes(d.rest())
    rl = _state["revocations"]
    rl.refresh()
    if rl.error is not None:
        assert rl.is_revoked(12345), "an unusable CRL must revoke everything"
