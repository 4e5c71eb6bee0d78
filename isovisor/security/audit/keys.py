"""The host's Ed25519 audit key: generation, storage and loading.

The private key is a PKCS#8 PEM file, mode 0600, owned by the daemon's user, in a directory
nobody else can write; loading refuses anything looser (as ssh does). The public key is a
SubjectPublicKeyInfo PEM file, mode 0644, to be copied off the host for verification.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from isovisor.security.audit.errors import AuditKeyError

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
KEY_DIR_MODE = 0o700
# A PEM Ed25519 key is about 120 bytes; anything much larger is not one.
MAX_KEY_FILE_BYTES = 16 * 1024


def key_id(public: Ed25519PublicKey) -> str:
    """32 hex digits naming a public key (its SHA-256, truncated)."""
    return hashlib.sha256(public_raw(public)).hexdigest()[:32]


def public_raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise AuditKeyError(f"not an Ed25519 public key: {exc}") from None


def verify_signature(public: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public.verify(signature, message)
    except InvalidSignature:
        return False
    return True


class AuditSigningKey:
    """The private half; only the daemon holds it."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_key = private.public_key()
        self.key_id = key_id(self.public_key)

    @classmethod
    def generate(cls) -> AuditSigningKey:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def private_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())

    def public_pem(self) -> bytes:
        return public_pem(self.public_key)


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_path(private_path: Path) -> Path:
    return private_path.with_suffix(".pub")


def generate_key(path: Path, *, overwrite: bool = False) -> AuditSigningKey:
    """Create a new key at ``path`` (0600) and its public half beside it (``.pub``, 0644)."""
    path.parent.mkdir(mode=KEY_DIR_MODE, parents=True, exist_ok=True)
    check_private_dir(path.parent)
    if path.exists() and not overwrite:
        raise AuditKeyError(f"audit key {path} already exists")
    key = AuditSigningKey.generate()
    write_file(path, key.private_pem(), PRIVATE_MODE, replace=overwrite)
    write_file(public_key_path(path), key.public_pem(), PUBLIC_MODE, replace=True)
    return key


def load_or_generate_key(path: Path) -> AuditSigningKey:
    if path.exists():
        return load_signing_key(path)
    return generate_key(path)


def load_signing_key(path: Path) -> AuditSigningKey:
    check_private_dir(path.parent)
    data = _read_small(path, private=True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AuditKeyError(f"audit key {path} is not a readable PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AuditKeyError(f"audit key {path} is not an Ed25519 key")
    return AuditSigningKey(key)


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read_small(path, private=False)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        try:  # a private key file holds the public key too
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise AuditKeyError(f"{path} is not a PEM public key") from None
        key = private.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(f"{path} is not an Ed25519 public key")
    return key


def _read_small(path: Path, *, private: bool) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AuditKeyError(f"audit key {path} does not exist") from None
    except OSError as exc:
        raise AuditKeyError(f"cannot open audit key {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AuditKeyError(f"audit key {path} is not a regular file")
        if private and st.st_uid != os.geteuid():
            raise AuditKeyError(
                f"audit key {path} is owned by uid {st.st_uid}, not by this user "
                f"(uid {os.geteuid()})")
        if private and st.st_mode & 0o077:
            raise AuditKeyError(
                f"audit key {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others "
                "can access it; it must be 0600")
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise AuditKeyError(f"{path} is too large to be a key")
    return data


def check_private_dir(directory: Path) -> None:
    """Refuse a directory someone other than us (or root) owns, or others can write."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise AuditKeyError(f"cannot examine key directory {directory}: {exc.strerror}") from None
    if st.st_uid not in (os.geteuid(), 0):
        raise AuditKeyError(f"key directory {directory} is owned by uid {st.st_uid}")
    if st.st_mode & 0o022:
        raise AuditKeyError(
            f"key directory {directory} has mode {stat.S_IMODE(st.st_mode):04o}: group or "
            "others could replace the key")


def write_file(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write a whole file durably with exactly ``mode``; never follows a symlink."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; make it exact
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    if replace:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise AuditKeyError(f"{path} already exists") from None
        finally:
            tmp.unlink()
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
