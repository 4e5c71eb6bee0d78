"""Errors of the TPM layer: one sentence each, naming the TPM and the operation."""

from __future__ import annotations


class TpmError(Exception):
    """The TPM (or swtpm) could not be reached or refused an operation."""
