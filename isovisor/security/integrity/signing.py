"""Ed25519 keys and signed JSON documents (the manifest and the policy).

A signed document is `{"document": {...}, "signature": base64, "key": fingerprint}`; the
signature covers the canonical JSON of "document" (sorted keys, no spaces, UTF-8). The
verifier pins the public key: a document signed by any other key is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from isovisor.security.integrity.errors import IntegrityError, SignatureError

MAX_DOCUMENT_BYTES = 64 << 20  # a manifest of a few thousand files is well under this


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def generate_key(private_path: Path) -> Path:
    """Write a new Ed25519 private key (PEM, 0600) and its public key beside it (.pub)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path = private_path.with_suffix(".pub")
    write_public_key(pub_path, key.public_key())
    return pub_path


def write_public_key(path: Path, key: Ed25519PublicKey) -> None:
    path.write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                      serialization.PublicFormat.SubjectPublicKeyInfo))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IntegrityError(f"cannot load the signing key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IntegrityError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise IntegrityError(f"cannot load the public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise IntegrityError(f"{path} is not an Ed25519 public key")
    return key


def fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def sign_document(document: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    return {"document": document,
            "signature": base64.b64encode(key.sign(canonical(document))).decode(),
            "key": fingerprint(key.public_key())}


def write_signed(path: Path, document: dict[str, Any], key: Ed25519PrivateKey) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(sign_document(document, key), indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_signed(path: Path, key: Ed25519PublicKey, what: str) -> dict[str, Any]:
    """The verified document of a signed file, or SignatureError / IntegrityError naming
    the file and what is wrong with it."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise IntegrityError(f"cannot read the {what} {path}: {exc.strerror}") from exc
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise IntegrityError(f"the {what} {path} is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        envelope = json.loads(raw)
        document, signature = envelope["document"], base64.b64decode(
            envelope["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"the {what} {path} is not a signed document: {exc}") from exc
    if not isinstance(document, dict):
        raise IntegrityError(f"the {what} {path} holds no document object")
    if envelope.get("key") != fingerprint(key):
        raise SignatureError(f"the {what} {path} is signed by key {envelope.get('key')!r}, "
                             f"not the pinned key {fingerprint(key)}")
    try:
        key.verify(signature, canonical(document))
    except InvalidSignature:
        raise SignatureError(f"the {what} {path} does not match its signature: it was "
                             "changed after signing") from None
    return document


def document_digest(document: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(document)).hexdigest()
