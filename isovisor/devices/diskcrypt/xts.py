"""AES-XTS-256 (IEEE 1619-2007) over whole 512-byte sectors, batched.

The data unit is one 512-byte sector and its tweak is the sector number as a 128-bit
little-endian integer: exactly dm-crypt's `aes-xts-plain64` with a 512-bit key and
512-byte sectors, and the same as `cryptography`'s XTS mode given
`sector.to_bytes(16, "little")` as the tweak, sector by sector (tests check both).

Why not that sector-by-sector loop: a Cipher object per 512 bytes costs microseconds of
Python each, ~128 of them per 64 KiB request. Here a request is three C calls and a few
numpy operations whatever its length:

1. E = AES-ECB_K2(sector numbers)             one call over all the sectors' tweaks;
2. T[s, j] = E[s] * alpha^j in GF(2^128)       j = 0..31, all at once with 64-bit lanes;
3. C = AES-ECB_K1(P xor T) xor T               (decrypt: P = AES-ECB^-1_K1(C xor T) xor T).

ECB contexts are stateless, so one encryptor (K2), one encryptor and one decryptor (K1)
serve every request. Multiplying by alpha^j (j < 64) is a 128-bit left shift by j; the j
bits shifted out, o, come back reduced modulo x^128 + x^7 + x^2 + x + 1 as o*0x87
(carry-less, at most 38 bits: no second reduction).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS: no threads (jailed worker)

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SECTOR_SIZE = 512
KEY_BYTES = 64  # two AES-256 keys: K1 (data), K2 (tweak)
BLOCK = 16
BLOCKS_PER_SECTOR = SECTOR_SIZE // BLOCK  # 32
U64_MAX = (1 << 64) - 1

_J = np.arange(BLOCKS_PER_SECTOR, dtype=np.uint64)  # 0..31
_INV_J = np.uint64(63) - _J  # (lo >> 1) >> (63 - j) == lo >> (64 - j), also for j = 0
_LOW_J_BITS = (np.uint64(1) << _J) - np.uint64(1)  # the j bits shifted out of hi

U64Array = npt.NDArray[np.uint64]


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
        k1, k2 = bytes(key[:32]), bytes(key[32:])
        self._tweak = Cipher(algorithms.AES(k2), modes.ECB()).encryptor()
        self._enc = Cipher(algorithms.AES(k1), modes.ECB()).encryptor()
        self._dec = Cipher(algorithms.AES(k1), modes.ECB()).decryptor()

    def tweaks(self, sector: int, count: int) -> U64Array:
        """T[s, j] for sectors sector..sector+count-1: a (count * 64,) array of uint64,
        the byte layout of the data it masks (two little-endian words per block)."""
        if sector < 0 or count < 0 or sector + count - 1 > U64_MAX:
            raise ValueError(f"sectors {sector}..+{count} are not 64-bit sector numbers")
        plain = np.zeros((count, 2), dtype=np.uint64)
        plain[:, 0] = np.arange(sector, sector + count, dtype=np.uint64)
        e = np.frombuffer(self._tweak.update(plain.tobytes()), dtype="<u8").reshape(count, 2)
        lo, hi = e[:, :1], e[:, 1:]  # (count, 1): broadcast against j
        out = np.empty((count, BLOCKS_PER_SECTOR, 2), dtype=np.uint64)
        carried = (lo >> np.uint64(1)) >> _INV_J  # lo's top j bits (0 for j = 0)
        over = ((hi >> np.uint64(1)) >> _INV_J) & _LOW_J_BITS  # hi's top j bits
        np.bitwise_or(hi << _J, carried, out=out[:, :, 1])
        red = over ^ (over << np.uint64(1)) ^ (over << np.uint64(2)) ^ (over << np.uint64(7))
        np.bitwise_xor(lo << _J, red, out=out[:, :, 0])
        return out.reshape(-1)

    def encrypt(self, sector: int, plain: bytes | bytearray | memoryview) -> bytes:
        """Ciphertext of whole sectors starting at `sector`."""
        return self._apply(self._enc, sector, plain)

    def decrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes:
        return self._apply(self._dec, sector, data)

    def decrypt_into(self, sector: int, data: bytes | bytearray | memoryview,
                     out: memoryview) -> None:
        """Decrypt `data` straight into `out` (same length; e.g. a view of guest RAM)."""
        t = self._check(sector, data)
        x = np.frombuffer(data, dtype="<u8") ^ t
        y = np.frombuffer(self._dec.update(x.tobytes()), dtype="<u8")
        np.bitwise_xor(y, t, out=np.frombuffer(out, dtype="<u8"))

    def _check(self, sector: int, data: bytes | bytearray | memoryview) -> U64Array:
        n = len(data)
        if n % SECTOR_SIZE:
            raise ValueError(f"{n} bytes is not a whole number of {SECTOR_SIZE}-byte sectors")
        return self.tweaks(sector, n // SECTOR_SIZE)

    def _apply(self, ctx: object, sector: int,
               data: bytes | bytearray | memoryview) -> bytes:
        t = self._check(sector, data)
        x = np.frombuffer(data, dtype="<u8") ^ t
        y = np.frombuffer(ctx.update(x.tobytes()), dtype="<u8")  # type: ignore[attr-defined]
        return (y ^ t).tobytes()
