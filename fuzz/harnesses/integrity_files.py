"""What the integrity chain reads back from files and from other hosts: the event log
(STATE/integrity/eventlog.json), signed documents (manifest, policy), policy documents,
and quote bundles given to the offline verifier. Oracle: only the documented errors
(IntegrityError and its subclasses) escape; nothing signed by another key, and no bundle
not signed by the pinned attestation key, is ever accepted."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fuzz.data import Data
from isovisor.security.integrity.attestation import load_bundle, verify_bundle
from isovisor.security.integrity.errors import EventLogError, IntegrityError, PolicyError
from isovisor.security.integrity.eventlog import EventLog
from isovisor.security.integrity.policy import Policy, parse_policy
from isovisor.security.integrity.signing import read_signed

COVERS = ("host:runtime/integrity-state",)
NONCE = "1700000000.00112233445566778899aabbccddeeff"
_state: dict[str, Any] = {}


def setup() -> None:
    if _state:
        return
    _state["tmp"] = tempfile.TemporaryDirectory(prefix="isovisor-fuzz-integrity-")
    _state["key"] = Ed25519PrivateKey.generate().public_key()
    ak = ec.generate_private_key(ec.SECP256R1()).public_key()
    _state["ak"] = ak.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def one_input(data: bytes) -> None:
    setup()
    d = Data(data)
    which = d.u8() % 4
    raw = d.rest()
    if which == 0:
        obj = _json(raw)
        try:
            log = EventLog.from_json(obj)
            log.replay()
            log.latest()
        except EventLogError:
            pass
    elif which == 1:
        obj = _json(raw)
        if isinstance(obj, dict):
            try:
                policy = parse_policy(obj, "fuzz")
                policy.check([])
            except PolicyError:
                pass
    elif which == 2:
        path = Path(_state["tmp"].name) / "signed.json"
        path.write_bytes(raw)
        try:
            read_signed(path, _state["key"], "document")
        except IntegrityError:
            return
        raise AssertionError("a document not signed by the pinned key was accepted")
    else:
        try:
            bundle = load_bundle(raw)
            verify_bundle(bundle, expected_nonce=NONCE, ak_pem=_state["ak"],
                          policy=Policy({}, frozenset()), now=1700000000.0)
        except IntegrityError:
            return
        raise AssertionError("a quote bundle not signed by the pinned AK was accepted")
