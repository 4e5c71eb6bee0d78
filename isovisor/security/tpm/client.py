"""The TPM through tpm2-pytss's ESAPI: SHA-256 PCRs, the attestation key, quotes.

Each operation opens its own connection (a few milliseconds): swtpm serves one client at a
time, and the `isovisor attest` command must be able to reach the TPM while the daemon
runs. tpm2-pytss errors become `TpmError` naming the operation.

The attestation key (AK) is a primary key in the endorsement hierarchy made from a fixed
template (ECC P-256, restricted, signing, fixedTPM): the TPM derives it again from its
endorsement seed whenever it is asked, so the same TPM always gives the same AK and the
key never leaves it. Its public half is what an offline verifier pins.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_PT_PCR
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMU_HA,
)

from isovisor.security.tpm.errors import TpmError

HOST_TPM = Path("/dev/tpmrm0")  # the kernel's resource-managed TPM device
PCR_COUNT = 24
DIGEST_SIZE = 32  # SHA-256 bank
AK_TEMPLATE = "ecc256:ecdsa-sha256"
AK_ATTRIBUTES = ("fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign"
                 "|noda")
# swtpm serves one client at a time and has a short window at start when its socket
# exists but does not accept yet: connecting is retried for this long.
CONNECT_RETRY_S = 2.0
MAX_QUALIFYING_DATA = 32  # we pass a SHA-256 digest; the TPM takes up to sizeof(TPMT_HA)

# tpm2-tss prints its own warnings to stderr on every failed connection; errors reach the
# caller as TpmError sentences instead.
os.environ.setdefault("TSS2_LOG", "all+none")


@dataclass(frozen=True)
class TpmAddress:
    """How to reach a TPM: a tpm2-tss TCTI name and its configuration string."""

    tcti: str
    conf: str

    @classmethod
    def device(cls, path: Path = HOST_TPM) -> TpmAddress:
        return cls("device", str(path))

    @classmethod
    def swtpm(cls, socket_path: Path) -> TpmAddress:
        return cls("swtpm", f"path={socket_path}")

    def describe(self) -> str:
        return f"{self.tcti}:{self.conf}"


@dataclass(frozen=True)
class Quote:
    """A TPM2_Quote: the marshalled TPMS_ATTEST it signed and the TPMT_SIGNATURE."""

    attest: bytes
    signature: bytes
    ak_public_pem: bytes


def _selection(pcrs: list[int]) -> TPML_PCR_SELECTION:
    for p in pcrs:
        if not 0 <= p < PCR_COUNT:
            raise TpmError(f"PCR {p} does not exist (0-{PCR_COUNT - 1})")
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in sorted(pcrs)))


def _ak_template() -> TPM2B_PUBLIC:
    template = TPM2B_PUBLIC.parse(AK_TEMPLATE, objectAttributes=AK_ATTRIBUTES)
    # A restricted signing key has no symmetric algorithm (TPM 2.0 Part 1, 25.3.1.3).
    template.publicArea.parameters.eccDetail.symmetric.algorithm = TPM2_ALG.NULL
    return template


class Tpm:
    def __init__(self, address: TpmAddress) -> None:
        self.address = address

    @contextlib.contextmanager
    def _esapi(self, what: str) -> Iterator[ESAPI]:
        deadline = time.monotonic() + CONNECT_RETRY_S
        while True:
            try:
                tcti = TCTILdr(self.address.tcti, self.address.conf)
                break
            except TSS2_Exception as exc:
                if time.monotonic() > deadline:
                    raise TpmError(f"cannot reach the TPM at {self.address.describe()} "
                                   f"({what}): {exc}") from exc
                time.sleep(0.01)
        try:
            with ESAPI(tcti) as esys:
                yield esys
        except TSS2_Exception as exc:
            raise TpmError(f"TPM {what} failed: {exc}") from exc
        finally:
            tcti.close()

    def extend(self, pcr: int, digest: bytes) -> None:
        if len(digest) != DIGEST_SIZE:
            raise TpmError(f"a SHA-256 extend needs {DIGEST_SIZE} bytes, not {len(digest)}")
        _selection([pcr])
        values = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256,
                                             digest=TPMU_HA(sha256=digest))])
        with self._esapi(f"PCR {pcr} extend") as esys:
            esys.pcr_extend(ESYS_TR.parse(f"pcr{pcr}"), values)

    def read_pcrs(self, pcrs: list[int]) -> dict[int, bytes]:
        """SHA-256 values of `pcrs` (at most 8 per TPM2_PCR_Read: read in one call)."""
        with self._esapi("PCR read") as esys:
            _counter, selected, digests = esys.pcr_read(_selection(pcrs))
        got = [i for i in range(PCR_COUNT)
               if bytes(selected.pcrSelections[0].pcrSelect)[i // 8] & (1 << (i % 8))]
        if got != sorted(pcrs) or len(digests) != len(got):
            raise TpmError(f"the TPM returned PCRs {got}, not {sorted(pcrs)} (SHA-256 bank "
                           "not allocated?)")
        return {p: bytes(d) for p, d in zip(got, digests, strict=True)}

    def resettable_pcrs(self) -> set[int]:
        """PCRs that software at locality 0 may reset (TPM_PT_PCR_RESET_L0): a value in one
        of them proves nothing, since anyone who can reach the TPM can zero and refill it."""
        with self._esapi("capability read") as esys:
            _more, data = esys.get_capability(TPM2_CAP.PCR_PROPERTIES,
                                              TPM2_PT_PCR.RESET_L0, 1)
        for prop in data.data.pcrProperties:
            if int(prop.tag) == int(TPM2_PT_PCR.RESET_L0):
                bits = bytes(prop.pcrSelect)
                return {i for i in range(len(bits) * 8) if bits[i // 8] & (1 << (i % 8))}
        return set()

    def boot_counts(self) -> tuple[int, int]:
        """(resetCount, restartCount) of the TPM's clock: they change when the host (or
        swtpm) restarts, which resets the PCRs."""
        with self._esapi("clock read") as esys:
            info = esys.read_clock().clockInfo
        return int(info.resetCount), int(info.restartCount)

    def attestation_key_pem(self) -> bytes:
        with self._esapi("attestation key") as esys:
            handle, public, _, _, _ = esys.create_primary(
                TPM2B_SENSITIVE_CREATE(), _ak_template(), ESYS_TR.ENDORSEMENT)
            esys.flush_context(handle)
        pem: bytes = public.to_pem()
        return pem

    def quote(self, pcrs: list[int], qualifying_data: bytes) -> Quote:
        if len(qualifying_data) > MAX_QUALIFYING_DATA:
            raise TpmError(f"qualifying data is {len(qualifying_data)} bytes; at most "
                           f"{MAX_QUALIFYING_DATA}")
        with self._esapi("quote") as esys:
            handle, public, _, _, _ = esys.create_primary(
                TPM2B_SENSITIVE_CREATE(), _ak_template(), ESYS_TR.ENDORSEMENT)
            try:
                attest, signature = esys.quote(handle, _selection(pcrs),
                                               TPM2B_DATA(qualifying_data),
                                               TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
            finally:
                esys.flush_context(handle)
        pem: bytes = public.to_pem()
        return Quote(bytes(attest), signature.marshal(), pem)
