"""Loads libisovisor_xts.so (xts_native.c, built by `make native`) with ctypes, once.

As a `PyDLL`: its calls keep the GIL. They only compute (a 4 KiB request takes ~2 us, the
largest, 1 MiB, a few hundred); releasing the GIL for them, as a `CDLL` does, measured
slower on this host: the device's I/O thread then often waits to get the GIL back from
the vCPU thread (bench/RESULTS.md, blk-crypt). A read from the image is made here only
with RWF_NOWAIT (`isx_read_decrypt`: page-cache hits, never a wait for the disk); any
other read is Python's os.preadv, which releases the GIL while the disk is waited for.

It is loaded when this module is imported, which in a VM worker is in the zygote before
any jail or seccomp filter (isovisor/worker/preload.py imports every device module):
dlopen, OpenSSL's CPU-feature probe and its default-provider set-up (which may read
openssl.cnf) all happen there. A known-answer check against `cryptography`'s XTS then runs
the library once, so a wrong or stale build is refused before it touches a disk and the
EVP method lookups are done before the filter is in place; afterwards a worker only calls
EVP_CIPHER_CTX_new/CipherInit/CipherUpdate/free, which need no system call beyond
memory allocation, and preadv2 (allowed: the worker's BLOCK_IO set). The jailed test
(tests/devices/diskcrypt/test_encrypted_disk_jailed.py) runs both directions under the
worker's seccomp filter.

A missing or broken library does not fail the import (plain disks do not need it);
`library()` raises XtsNativeError naming `make native` when an encrypted disk asks.
There is no slow fallback.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

LIBRARY_PATH = Path(__file__).with_name("libisovisor_xts.so")
MAKE_TARGET = "make native"

# Known answer: a fixed key and sector, against OpenSSL's own XTS (cryptography).
_KAT_KEY = bytes(range(64))
_KAT_SECTOR = (1 << 63) + 0x1234  # high bits set: the 64-bit sector number, little-endian
_KAT_PLAIN = bytes(range(256)) * 4  # two sectors


class XtsNativeError(RuntimeError):
    """The native AES-XTS library is missing or unusable; the message says how to build."""


def _declare(lib: ctypes.PyDLL) -> ctypes.PyDLL:
    lib.isx_new.argtypes = [ctypes.c_char_p]
    lib.isx_new.restype = ctypes.c_void_p
    lib.isx_free.argtypes = [ctypes.c_void_p]
    lib.isx_free.restype = None
    lib.isx_crypt.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64]
    lib.isx_crypt.restype = ctypes.c_int
    lib.isx_read_decrypt.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.isx_read_decrypt.restype = ctypes.c_int
    return lib


def _reference(sector: int, data: bytes) -> bytes:
    out = b""
    for i in range(len(data) // 512):
        tweak = (sector + i).to_bytes(16, "little")
        enc = Cipher(algorithms.AES(_KAT_KEY), modes.XTS(tweak)).encryptor()
        out += enc.update(data[i * 512 : (i + 1) * 512]) + enc.finalize()
    return out


def _known_answer(lib: ctypes.PyDLL) -> None:
    h = lib.isx_new(_KAT_KEY)
    if not h:
        raise XtsNativeError(f"{LIBRARY_PATH}: isx_new failed (libcrypto unusable)")
    try:
        n = len(_KAT_PLAIN)
        buf = ctypes.create_string_buffer(_KAT_PLAIN, n)
        if lib.isx_crypt(h, 1, buf, buf, n, _KAT_SECTOR) != 0:
            raise XtsNativeError(f"{LIBRARY_PATH}: isx_crypt failed on its known answer")
        if buf.raw != _reference(_KAT_SECTOR, _KAT_PLAIN):
            raise XtsNativeError(f"{LIBRARY_PATH}: wrong AES-XTS output; rebuild it "
                                   f"with `{MAKE_TARGET}`")
        if lib.isx_crypt(h, 0, buf, buf, n, _KAT_SECTOR) != 0 or buf.raw != _KAT_PLAIN:
            raise XtsNativeError(f"{LIBRARY_PATH}: decryption does not invert encryption")
    finally:
        lib.isx_free(h)


def load(path: Path = LIBRARY_PATH) -> ctypes.PyDLL:
    """The library at `path`, declared and checked, or XtsNativeError."""
    if not path.is_file():
        raise XtsNativeError(f"the native AES-XTS library {path} is missing: build it "
                               f"with `{MAKE_TARGET}` (part of `make setup`)")
    try:
        lib = _declare(ctypes.PyDLL(str(path)))
    except (OSError, AttributeError) as exc:
        raise XtsNativeError(f"{path} cannot be loaded ({exc}): rebuild it with "
                               f"`{MAKE_TARGET}`") from None
    _known_answer(lib)
    return lib


_loaded: ctypes.PyDLL | None = None
_error: XtsNativeError | None = None
try:
    _loaded = load()
except XtsNativeError as exc:
    _error = exc


def library() -> ctypes.PyDLL:
    """The library loaded at import, or the XtsNativeError that import met."""
    if _loaded is None:
        assert _error is not None
        raise _error
    return _loaded
