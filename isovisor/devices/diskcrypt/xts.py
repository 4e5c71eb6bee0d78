"""AES-XTS-256 (IEEE 1619-2007) over whole 512-byte sectors, in native code.

The data unit is one 512-byte sector and its tweak is the sector number as a 128-bit
little-endian integer: exactly dm-crypt's `aes-xts-plain64` with a 512-bit key and
512-byte sectors, and the same as `cryptography`'s XTS mode given
`sector.to_bytes(16, "little")` as the tweak, sector by sector (tests check both).

The work is done by `xts_native.c` (built by `make native` into libisovisor_xts.so beside
this file, loaded with ctypes by `xts_native_lib.py`): one call per request whatever its
length, the AES being OpenSSL's (AES-NI). This module checks
every argument before that call (whole sectors, equal lengths, writable output, 64-bit
sector numbers): the C code is never given a length its buffers do not have.

There is no slower fallback: without the library, making a `SectorCipher` raises
`XtsNativeError`, which names `make native` (an encrypted disk then fails to open, and
says why; plain disks are unaffected).
"""

from __future__ import annotations

import ctypes
import weakref

from isovisor.devices.diskcrypt import xts_native_lib as native
from isovisor.devices.diskcrypt.xts_native_lib import XtsNativeError

SECTOR_SIZE = 512
KEY_BYTES = 64  # two AES-256 keys: K1 (data), K2 (tweak)
U64_MAX = (1 << 64) - 1
OFF_MAX = (1 << 63) - 1  # off_t
_EAGAIN = -3  # isx_read_decrypt: not all in the page cache

__all__ = ["KEY_BYTES", "SECTOR_SIZE", "SectorCipher", "XtsKeyError", "XtsNativeError",
           "check_key"]

Buffer = bytes | bytearray | memoryview


class XtsKeyError(ValueError):
    """A key that XTS-AES-256 cannot use; the message says why."""


def check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != KEY_BYTES:
        n = len(key) if isinstance(key, bytes | bytearray) else type(key).__name__
        raise XtsKeyError(f"an XTS-AES-256 key is {KEY_BYTES} bytes, not {n}")
    if key[:32] == key[32:]:
        # IEEE 1619-2018 §5.1 and OpenSSL 3: the two halves must differ.
        raise XtsKeyError("the two halves of an XTS key must differ")


class SectorCipher:
    """AES-XTS-256 for whole sectors. Not thread-safe (one device I/O thread uses it)."""

    def __init__(self, key: bytes) -> None:
        check_key(key)
        lib = native.library()  # XtsNativeError, naming `make native`
        handle = lib.isx_new(bytes(key))
        if not handle:
            raise RuntimeError("libcrypto could not set up AES-256-ECB contexts")
        self._crypt = lib.isx_crypt
        self._read = lib.isx_read_decrypt
        self._handle: int | None = handle
        # frees (and wipes) the key schedules when the cipher goes, if close() did not
        self._finalizer = weakref.finalize(self, lib.isx_free, handle)

    def close(self) -> None:
        """Wipe and free the key schedules now; the cipher cannot be used afterwards."""
        self._handle = None
        self._finalizer()

    def encrypt(self, sector: int, plain: Buffer) -> bytes:
        """Ciphertext of whole sectors starting at `sector`."""
        out = bytearray(len(plain))
        self._run(True, sector, plain, out)
        return bytes(out)

    def decrypt(self, sector: int, data: Buffer) -> bytes:
        out = bytearray(len(data))
        self._run(False, sector, data, out)
        return bytes(out)

    def decrypt_into(self, sector: int, data: Buffer, out: bytearray | memoryview) -> None:
        """Decrypt `data` straight into `out` (same length; e.g. a view of guest RAM)."""
        self._run(False, sector, data, out)

    def encrypt_into(self, sector: int, data: Buffer, out: bytearray | memoryview) -> None:
        self._run(True, sector, data, out)

    def read_decrypt_cached(self, fd: int, offset: int, scratch: bytearray | memoryview,
                            out: bytearray | memoryview) -> bool:
        """Decrypt the sectors of `fd` at byte `offset` into `out` if they are all in the
        page cache (one preadv2 with RWF_NOWAIT into `scratch`, the caller's private
        buffer of the same length, then the decryption, in one native call); False,
        with `out` untouched, if not (or if that read failed in any way): the caller
        then reads the usual way and calls `decrypt_into`."""
        n = _nbytes(out)
        if (n % SECTOR_SIZE or offset % SECTOR_SIZE or offset < 0 or offset + n > OFF_MAX
                or _nbytes(scratch) != n):
            raise ValueError(f"{n} bytes at offset {offset} (through {_nbytes(scratch)}) "
                             "are not whole sectors of a file")
        _check_output(out)
        _check_output(scratch)
        if self._handle is None:
            raise ValueError("this SectorCipher is closed")
        if n == 0:
            return True
        # SAFETY: `tmp` and `dst` export buffers checked above to be `n` writable bytes
        # each, and keep them from being freed or resized until the call returns; the C
        # code reads the file into [tmp, tmp + n) and writes [dst, dst + n) only.
        tmp = _CHAR.from_buffer(scratch)
        dst = _CHAR.from_buffer(out)
        rc = self._read(self._handle, fd, offset, _addressof(tmp), _addressof(dst), n)
        if rc == _EAGAIN:
            return False
        if rc != 0:
            raise RuntimeError(f"native AES-XTS failed ({rc}) at offset {offset}")
        return True

    def _run(self, encrypt: bool, sector: int, data: Buffer,
             out: bytearray | memoryview) -> None:
        n = _nbytes(data)
        if n % SECTOR_SIZE or _nbytes(out) != n:
            raise ValueError(f"{n} bytes (into {_nbytes(out)}) is not a whole number of "
                             f"{SECTOR_SIZE}-byte sectors of the same length")
        count = n // SECTOR_SIZE
        if sector < 0 or (count and sector + count - 1 > U64_MAX):
            raise ValueError(f"sectors {sector}..+{count} are not 64-bit sector numbers")
        _check_output(out)
        if self._handle is None:
            raise ValueError("this SectorCipher is closed")
        if n == 0:
            return
        # SAFETY: `src` and `dst` are exports of buffers whose lengths were checked above
        # to be `n` bytes; holding them keeps those buffers from being freed or resized
        # until the call returns. The C code reads [src, src + n) and writes
        # [dst, dst + n) only, and checks the length and sector range again.
        # (bytes are passed as they are: immutable, kept alive by `data`.)
        src = _export(data, n)
        dst = _CHAR.from_buffer(out)
        rc = self._crypt(self._handle, encrypt, src if isinstance(src, bytes)
                         else _addressof(src), _addressof(dst), n, sector)
        if rc != 0:
            raise RuntimeError(f"native AES-XTS failed ({rc}) on sectors {sector}..+{count}")


_CHAR = ctypes.c_char
_addressof = ctypes.addressof


def _check_output(out: object) -> None:
    if not isinstance(out, bytearray) and (not isinstance(out, memoryview) or out.readonly
                                           or not out.c_contiguous):
        raise ValueError(f"the output must be a writable contiguous buffer, not "
                         f"{type(out).__name__}")


def _nbytes(buf: Buffer) -> int:
    return buf.nbytes if isinstance(buf, memoryview) else len(buf)


def _export(data: Buffer, n: int) -> bytes | ctypes.c_char | ctypes.Array[ctypes.c_char]:
    """`data` for the C call: bytes as they are, a writable buffer exported in place, a
    read-only view copied once (each input byte is still read once, by that copy)."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, memoryview) and data.readonly:
        return (_CHAR * n).from_buffer_copy(data)
    return _CHAR.from_buffer(data)
