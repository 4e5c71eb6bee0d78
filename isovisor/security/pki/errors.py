"""Errors of the host certificate authority."""

from __future__ import annotations


class PkiError(Exception):
    """A CA operation failed; the message is one sentence for the operator."""


class CaMissingError(PkiError):
    """The CA directory holds no CA (run `isovisor ca init`)."""


class CaExistsError(PkiError):
    """`ca init` would overwrite an existing CA."""


class UnknownCertificateError(PkiError):
    """No certificate with that serial number or name was issued by this CA."""
