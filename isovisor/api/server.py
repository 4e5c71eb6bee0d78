"""Serving the API: uvicorn with the mutual-TLS context and protocol, on a thread of its
own (the caller keeps the main thread and its signals). There is no plaintext listener:
the server refuses to start without TLS material."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from cryptography import x509

from isovisor.api.app import Api
from isovisor.api.tls import mtls_protocol, server_context
from isovisor.security.pki import RevocationList

log = logging.getLogger(__name__)
START_TIMEOUT = 15.0

# (kind, detail, client) for authentication failures: the audit log's security events.
SecurityEventHook = Callable[[str, str, str], None]


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    crl: Path
    cert: Path
    key: Path

    def revocation_list(self) -> RevocationList:
        return RevocationList(self.crl, x509.load_pem_x509_certificate(
            self.ca_cert.read_bytes()))

    def check(self) -> TlsFiles:
        for label, path in (("CA certificate", self.ca_cert), ("CRL", self.crl),
                            ("server certificate", self.cert), ("server key", self.key)):
            if not path.is_file():
                raise FileNotFoundError(f"the API needs its {label} at {path}; refusing to "
                                        "serve without TLS")
        return self


class ApiServer:
    def __init__(self, api: Api, tls: TlsFiles, revocations: RevocationList,
                 host: str = "127.0.0.1", port: int = 0,
                 on_security_event: SecurityEventHook | None = None) -> None:
        tls.check()
        self.api = api
        self.tls = tls
        self.revocations = revocations
        self.revocations.refresh()
        on_event = on_security_event or (lambda kind, detail, client: None)

        def handshake_failed(reason: str) -> None:
            log.info("TLS handshake refused: %s", reason)
            on_event("authentication_failure", f"TLS handshake refused: {reason}", "unknown")

        def rejected(reason: str, client: str) -> None:
            log.info("connection from %s refused: %s", client, reason)
            on_event("authentication_failure", reason, client)

        self.context = server_context(tls.ca_cert, tls.crl, tls.cert, tls.key,
                                      on_handshake_failure=handshake_failed)
        protocol = mtls_protocol(self.revocations, self.context, on_rejected=rejected)
        config = uvicorn.Config(
            api.asgi, host=host, port=port, http=protocol, ws="none", lifespan="off",
            ssl_context_factory=lambda _cfg, _default: self.context,
            log_level="warning", access_log=False, server_header=False,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.port = port

    def start(self) -> int:
        """Serve on a background thread; returns the bound port once listening."""
        self._thread = threading.Thread(target=self._server.run, name="api-server",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the API server failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError("the API server did not start in time")
            time.sleep(0.01)
        sockets = self._server.servers[0].sockets
        self.port = int(sockets[0].getsockname()[1])
        return self.port

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
