"""The CRL as the daemon sees it: reloaded whenever the file changes, signature checked,
fail closed (an unreadable, forged or expired CRL revokes everything)."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec


class RevocationList:
    def __init__(self, crl_path: Path, ca_cert: x509.Certificate) -> None:
        self.path = crl_path
        self._ca_cert = ca_cert
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._revoked: frozenset[int] | None = None  # None: no valid CRL (fail closed)
        self._next_update: dt.datetime | None = None
        self.error: str | None = None

    def is_revoked(self, serial: int) -> bool:
        self.refresh()
        if self._revoked is None:
            return True
        if self._next_update is not None and dt.datetime.now(dt.UTC) > self._next_update:
            self.error = f"the CRL {self.path} expired at {self._next_update.isoformat()}"
            return True
        return serial in self._revoked

    def refresh(self) -> bool:
        """Reload if the file changed; True when it did."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            with self._lock:
                self._stamp, self._revoked = None, None
                self.error = f"cannot read the CRL {self.path}: {exc.strerror}"
            return True
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp == self._stamp:
                return False
            self._stamp = stamp
            self._revoked, self._next_update, self.error = self._load()
            return True

    def _load(self) -> tuple[frozenset[int] | None, dt.datetime | None, str | None]:
        try:
            crl = x509.load_pem_x509_crl(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            return None, None, f"cannot parse the CRL {self.path}: {exc}"
        key = self._ca_cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(key):
            return None, None, f"the CRL {self.path} is not signed by the host CA"
        return frozenset(r.serial_number for r in crl), crl.next_update_utc, None
