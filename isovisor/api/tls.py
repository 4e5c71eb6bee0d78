"""Mutual TLS for the management API.

- The server context speaks TLS 1.3 only, requires a client certificate, verifies it
  against the host CA and the CRL (leaf check), and rejects anything else in the
  handshake: no certificate, an expired one, one from another CA, a revoked one.
- `mtls_protocol` makes a uvicorn HTTP protocol class that reads the verified peer
  certificate from the TLS transport when the connection is made, checks it once more
  against the current CRL (revocations since the context loaded it take effect at
  once), and puts the identity into every request's ASGI scope under `PEER_KEY`.
- Handshake failures are reported through the context's `on_handshake_failure`
  (asyncio only logs them at debug level): an SSLObject subclass catches them.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from uvicorn.protocols.http.h11_impl import H11Protocol

from isovisor.security.pki import RevocationList

log = logging.getLogger(__name__)

PEER_KEY = "isovisor.peer"
HandshakeFailureHook = Callable[[str], None]


@dataclass(frozen=True)
class PeerCertificate:
    """The verified client certificate of a connection: the principal's identity."""

    name: str  # subject common name = principal name
    serial: int
    not_after: dt.datetime
    client: str  # "host:port"


def peer_from_der(der: bytes, client: str) -> PeerCertificate:
    cert = x509.load_der_x509_certificate(der)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ValueError("the client certificate must carry exactly one common name")
    value = names[0].value
    name = value if isinstance(value, str) else value.decode()
    return PeerCertificate(name, cert.serial_number, cert.not_valid_after_utc, client)


class MtlsContext(ssl.SSLContext):
    """An SSLContext that knows whom to tell about failed handshakes."""

    on_handshake_failure: HandshakeFailureHook | None = None


class _ReportingSSLObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            hook = getattr(self.context, "on_handshake_failure", None)
            if hook is not None:
                try:
                    hook(getattr(exc, "verify_message", None) or exc.reason or str(exc))
                except Exception:
                    log.exception("handshake failure hook failed")
            raise


def server_context(ca_cert: Path, crl: Path, cert: Path, key: Path,
                   on_handshake_failure: HandshakeFailureHook | None = None) -> MtlsContext:
    ctx = MtlsContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_cert))
    ctx.load_verify_locations(cafile=str(crl))
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    ctx.load_cert_chain(str(cert), str(key))
    ctx.options |= ssl.OP_NO_TICKET  # no session resumption: every connection shows its cert
    ctx.sslobject_class = _ReportingSSLObject
    ctx.on_handshake_failure = on_handshake_failure
    return ctx


def client_context(ca_cert: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(ca_cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    return ctx


def mtls_protocol(revocations: RevocationList, context: ssl.SSLContext,
                  on_rejected: Callable[[str, str], None] | None = None) -> type[H11Protocol]:
    """A uvicorn protocol class bound to this server's revocation list and TLS context.

    `on_rejected(reason, client)` hears about connections refused after the handshake."""

    class MtlsH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if revocations.refresh():
                # New CRL on disk: load it into the TLS context as well (OpenSSL uses the
                # CRL with the latest lastUpdate) so the handshake refuses it next time.
                try:
                    context.load_verify_locations(cafile=str(revocations.path))
                except (OSError, ssl.SSLError) as exc:
                    log.warning("cannot load the new CRL into the TLS context: %s", exc)
            peername = transport.get_extra_info("peername")
            client = f"{peername[0]}:{peername[1]}" if peername else "unknown"
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            reason = None
            peer = None
            if not der:
                reason = "no verified client certificate"
            else:
                try:
                    peer = peer_from_der(der, client)
                except ValueError as exc:
                    reason = str(exc)
                else:
                    if revocations.is_revoked(peer.serial):
                        reason = (f"certificate {peer.serial:x} of {peer.name!r} is revoked"
                                  if revocations.error is None else revocations.error)
            if reason is not None or peer is None:
                if on_rejected is not None:
                    on_rejected(reason or "rejected", client)
                transport.close()
                return
            # app_state is copied into each request's scope["state"]; a per-connection copy
            # carries the identity without touching the shared lifespan state.
            self.app_state = {**self.app_state, PEER_KEY: peer}

    return MtlsH11Protocol
