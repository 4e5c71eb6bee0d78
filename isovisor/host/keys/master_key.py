"""Where the host master key comes from: a `MasterKeySource`.

`FileMasterKey` is the one in use: 32 random bytes in a root-only file (0600, owned by
the daemon's user, no symlink followed) in the daemon's state directory, created on first
use. `TpmSealedMasterKey` (tpm_master_key.py) implements the same `load() -> bytes` with
the key sealed to the TPM; the daemon uses it when it runs with its TPM (`[integrity]`).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Protocol

MASTER_KEY_BYTES = 32  # AES-256 key-encryption key


class MasterKeyError(Exception):
    """The master key cannot be used; the message names the file and says why."""


class MasterKeySource(Protocol):
    def load(self) -> bytes:
        """The 32-byte master key (created on first use where the source can)."""
        ...


class FileMasterKey:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> bytes:
        key = read_private_file(self.path, "master key", MASTER_KEY_BYTES + 1)
        if key is None:
            return self._create()
        if len(key) != MASTER_KEY_BYTES:
            raise MasterKeyError(f"master key {self.path} holds {len(key)} bytes, "
                                 f"not {MASTER_KEY_BYTES}")
        return key

    def _create(self) -> bytes:
        key = os.urandom(MASTER_KEY_BYTES)
        write_private_file(self.path, key)
        return key


def read_private_file(path: Path, what: str, limit: int) -> bytes | None:
    """At most `limit` bytes of a root-only key file (a regular file, mode 0600, owned by
    the daemon's user, no symlink followed); None when it does not exist. Errors name
    `what`, the path and the fault."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MasterKeyError(f"{what} {path} is a symlink") from None
        raise MasterKeyError(f"{what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise MasterKeyError(f"{what} {path} is not a regular file")
        if st.st_mode & 0o077:
            raise MasterKeyError(f"{what} {path} has mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}; it must be 0600")
        if st.st_uid != os.geteuid():
            raise MasterKeyError(f"{what} {path} is owned by uid {st.st_uid}, "
                                 f"not the daemon's ({os.geteuid()})")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def write_private_file(path: Path, data: bytes) -> None:
    """Create `path` (refused if it exists; no symlink followed) as a 0600 file holding
    `data`, fsynced; its directory is made 0700 if missing."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
