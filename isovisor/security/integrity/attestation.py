"""Remote attestation: a TPM quote over isovisor's PCRs with the event log, and its
offline verifier.

Freshness: the verifier issues the nonce (`issue_nonce`: "<unix seconds>.<128 random
bits in hex>") and keeps it; the TPM signs SHA-256("isovisor-attest-v1" NUL nonce) as the
quote's qualifying data (extraData). `verify_bundle` takes the nonce it expects: a quote
made for another nonce fails, and one older than `max_age` seconds (judged by the issue
time bound into the nonce, on the verifier's clock) is stale. The TPM's own clock in the
quote is not used for age (it counts since the TPM's last clear, unknown to an offline
verifier); its resetCount/restartCount must equal those the event log was begun in, so
a log from another boot of the host does not verify.

Verification, each step refusing with a sentence naming it: the AK signature (ECDSA P-256
over the TPMS_ATTEST, against the AK public key the verifier pinned), the structure
(TPM_GENERATED magic, a quote), the nonce, the age, the PCR selection, the event log
replayed (digests recomputed) to the quote's PCR digest, the boot counters, the policy
(its signature) over every event.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPM2_GENERATED, TPM2_ST
from tpm2_pytss.types import TPMS_ATTEST, TPMT_SIGNATURE

from isovisor.security.integrity.errors import AttestationError, EventLogError
from isovisor.security.integrity.eventlog import EventLog, EventLogFile
from isovisor.security.integrity.policy import Policy
from isovisor.security.tpm import Tpm

SCHEMA = 1
DOMAIN = b"isovisor-attest-v1"
NONCE_RE = re.compile(r"^(\d{1,12})\.([0-9a-f]{32})$")
MAX_NONCE_CHARS = 256
DEFAULT_MAX_AGE_S = 300.0
CLOCK_SKEW_S = 60.0  # a nonce "issued" further in the future than this is refused
MAX_BUNDLE_BYTES = 64 << 20


def issue_nonce(now: float | None = None) -> str:
    return f"{int(time.time() if now is None else now)}.{secrets.token_hex(16)}"


def qualifying_data(nonce: str) -> bytes:
    if not nonce or len(nonce) > MAX_NONCE_CHARS or not nonce.isprintable():
        raise AttestationError(f"a nonce is 1-{MAX_NONCE_CHARS} printable characters")
    return hashlib.sha256(DOMAIN + b"\0" + nonce.encode()).digest()


def make_bundle(tpm: Tpm, log_file: EventLogFile, nonce: str) -> dict[str, Any]:
    """Quote the log's PCRs for `nonce`; the log is read under the daemon's lock, so it
    matches the PCRs quoted."""
    data = qualifying_data(nonce)
    with log_file.locked(exclusive=False):
        event_log = log_file.load()
        if event_log is None:
            raise EventLogError(f"no event log at {log_file.path}: has the daemon measured "
                                "this boot?")
        quote = tpm.quote(event_log.pcrs, data)
    return {"schema": SCHEMA, "nonce": nonce,
            "quote": base64.b64encode(quote.attest).decode(),
            "signature": base64.b64encode(quote.signature).decode(),
            "ak_public": quote.ak_public_pem.decode(), "event_log": event_log.to_json()}


@dataclass(frozen=True)
class Verified:
    nonce: str
    age_s: float
    pcrs: dict[int, str]
    events: int
    boot: tuple[int, int]


def _field(bundle: dict[str, Any], name: str) -> Any:
    if name not in bundle:
        raise AttestationError(f"the bundle has no {name!r}")
    return bundle[name]


def _b64(bundle: dict[str, Any], name: str) -> bytes:
    try:
        return base64.b64decode(_field(bundle, name), validate=True)
    except (ValueError, TypeError) as exc:
        raise AttestationError(f"bundle field {name!r} is not base64") from exc


def load_bundle(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_BUNDLE_BYTES:
        raise AttestationError(f"the bundle is larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        bundle = json.loads(raw)
    except ValueError as exc:
        raise AttestationError(f"the bundle is not JSON: {exc}") from exc
    if not isinstance(bundle, dict) or bundle.get("schema") != SCHEMA:
        raise AttestationError(f"the bundle is not an isovisor quote bundle (schema {SCHEMA})")
    return bundle


def _check_signature(attest: bytes, sig_bytes: bytes, ak: ec.EllipticCurvePublicKey) -> None:
    try:
        sig, _ = TPMT_SIGNATURE.unmarshal(sig_bytes)
        if sig.sigAlg != TPM2_ALG.ECDSA or sig.signature.ecdsa.hash != TPM2_ALG.SHA256:
            raise AttestationError("the quote is not signed with ECDSA-SHA256")
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
    except AttestationError:
        raise
    except Exception as exc:  # tss2-mu raises its own types on malformed bytes
        raise AttestationError(f"the quote signature is malformed: {exc}") from exc
    try:
        ak.verify(encode_dss_signature(r, s), attest, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AttestationError("the quote's signature does not verify with the pinned "
                               "attestation key: another TPM, or the quote was altered"
                               ) from None


def _selected(attest: Any) -> list[int]:
    sels = attest.attested.quote.pcrSelect
    out: list[int] = []
    for i in range(sels.count):
        sel = sels.pcrSelections[i]
        if sel.hash != TPM2_ALG.SHA256:
            raise AttestationError("the quote covers a PCR bank other than SHA-256")
        bits = bytes(sel.pcrSelect)[: sel.sizeofSelect]
        out += [p for p in range(len(bits) * 8) if bits[p // 8] & (1 << (p % 8))]
    return sorted(out)


def verify_bundle(bundle: dict[str, Any], *, expected_nonce: str, ak_pem: bytes,
                  policy: Policy, now: float | None = None,
                  max_age: float = DEFAULT_MAX_AGE_S) -> Verified:
    """Raises AttestationError naming the first check that fails."""
    now = time.time() if now is None else now
    try:
        ak = serialization.load_pem_public_key(ak_pem)
    except ValueError as exc:
        raise AttestationError(f"the pinned attestation key is not a PEM public key: {exc}"
                               ) from exc
    if not isinstance(ak, ec.EllipticCurvePublicKey):
        raise AttestationError("the pinned attestation key is not an ECC key")
    attest_bytes, sig_bytes = _b64(bundle, "quote"), _b64(bundle, "signature")
    _check_signature(attest_bytes, sig_bytes, ak)
    try:
        attest, _ = TPMS_ATTEST.unmarshal(attest_bytes)
        magic, kind = attest.magic, attest.type
        extra = bytes(attest.extraData)
        pcr_digest = bytes(attest.attested.quote.pcrDigest)
        clock = attest.clockInfo
        boot = (int(clock.resetCount), int(clock.restartCount))
    except Exception as exc:
        raise AttestationError(f"the quote is malformed: {exc}") from exc
    if magic != TPM2_GENERATED.VALUE or kind != TPM2_ST.ATTEST_QUOTE:
        raise AttestationError("the signed structure is not a TPM-generated quote")
    # Freshness: the nonce the verifier expects, then its age.
    if extra != qualifying_data(expected_nonce):
        raise AttestationError("the quote was made for another nonce (replayed or not made "
                               "for this challenge)")
    m = NONCE_RE.match(expected_nonce)
    if m is None:
        raise AttestationError("the nonce carries no issue time (use `isovisor attest "
                               "nonce`), so the quote's age cannot be checked")
    age = now - int(m.group(1))
    if age > max_age:
        raise AttestationError(f"stale quote: its nonce was issued {age:.0f} s ago, more "
                               f"than the maximum age of {max_age:.0f} s")
    if age < -CLOCK_SKEW_S:
        raise AttestationError("the nonce was issued in the future (clock skew?)")
    # The event log explains the PCRs the TPM signed.
    try:
        event_log = EventLog.from_json(_field(bundle, "event_log"))
        expected = event_log.replay()
    except EventLogError as exc:
        raise AttestationError(f"the bundle's event log: {exc}") from exc
    selected = _selected(attest)
    if selected != sorted(event_log.pcrs):
        raise AttestationError(f"the quote covers PCRs {selected}, the event log "
                               f"{sorted(event_log.pcrs)}")
    replayed = hashlib.sha256(b"".join(expected[p] for p in selected)).digest()
    if replayed != pcr_digest:
        raise AttestationError(
            f"the event log ({len(event_log.events)} events) does not replay to the PCRs "
            "the TPM signed: the log was altered, or the PCRs were extended outside it")
    if event_log.boot != boot:
        raise AttestationError(f"the event log belongs to TPM boot {event_log.boot}, the "
                               f"quote to {boot}")
    refusals = policy.check(event_log.events)
    if refusals:
        more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
        raise AttestationError(f"policy: {refusals[0]}{more}")
    return Verified(expected_nonce, age, {p: expected[p].hex() for p in selected},
                    len(event_log.events), boot)
