"""The TPM 2.0: the host's /dev/tpmrm0 when present, otherwise a swtpm the daemon starts.

`Tpm` (client.py) wraps tpm2-pytss's ESAPI: extend and read PCRs (SHA-256 bank), create
the attestation key, quote. `Swtpm` (swtpm.py) runs a real swtpm process for development
and tests. `open_tpm` picks one of them.
"""

from isovisor.security.tpm.client import Quote, Tpm, TpmAddress
from isovisor.security.tpm.errors import TpmError
from isovisor.security.tpm.swtpm import Swtpm

__all__ = ["Quote", "Swtpm", "Tpm", "TpmAddress", "TpmError"]
