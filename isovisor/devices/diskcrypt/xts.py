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
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

SECTOR_SIZE = 512
KEY_BYTES = 64  # two AES-256 keys: K1 (data), K2 (tweak)
BLOCK = 16
BLOCKS_PER_SECTOR = SECTOR_SIZE // BLOCK  # 32
U64_MAX = (1 << 64) - 1

MAX_SECTORS = 2048  # per call: 1 MiB (the encrypted disk's chunk); larger calls split
_J = np.arange(BLOCKS_PER_SECTOR, dtype=np.uint64)  # 0..31
# A word's top j bits, for j = 0..31, from its top 31 bits h = w >> 33: h >> (31 - j)
# (0 for j = 0; no shift reaches 64 bits).
_TOP_SHIFT = np.uint64(31) - _J
_SECTOR_STEP = np.arange(MAX_SECTORS, dtype=np.uint64)

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
        # Scratch, reused by every call (one I/O thread): no allocation per request.
        words = MAX_SECTORS * SECTOR_SIZE // 8
        self._tin = np.zeros((MAX_SECTORS, 2), dtype=np.uint64)  # tweak inputs
        self._tout = bytearray(MAX_SECTORS * BLOCK + BLOCK)  # E_K2(sector)
        self._t = np.empty(words, dtype=np.uint64)  # the tweaks T[s, j]
        self._x = np.empty(words, dtype=np.uint64)  # data xor T
        self._y = bytearray(MAX_SECTORS * SECTOR_SIZE + BLOCK)  # AES-ECB output

    def tweaks(self, sector: int, count: int) -> U64Array:
        """T[s, j] for sectors sector..sector+count-1 (count <= MAX_SECTORS): a
        (count * 64,) view of uint64 (valid until the next call), in the byte layout of
        the data it masks (two little-endian words per block)."""
        if sector < 0 or not 0 <= count <= MAX_SECTORS or sector + count - 1 > U64_MAX:
            raise ValueError(f"sectors {sector}..+{count} are not 64-bit sector numbers "
                             f"(at most {MAX_SECTORS} per call)")
        tin = self._tin[:count]
        np.add(_SECTOR_STEP[:count], np.uint64(sector), out=tin[:, 0])
        self._tweak.update_into(tin.data.cast("B"), self._tout)
        e = np.frombuffer(self._tout, dtype="<u8", count=count * 2).reshape(count, 1, 2)
        lo, hi = e[:, :, 0], e[:, :, 1]  # (count, 1): broadcast against j
        out = self._t[: count * 64].reshape(count, BLOCKS_PER_SECTOR, 2)
        np.left_shift(hi, _J, out=out[:, :, 1])
        out[:, :, 1] |= (lo >> np.uint64(33)) >> _TOP_SHIFT  # lo's top j bits move up
        over = (hi >> np.uint64(33)) >> _TOP_SHIFT  # hi's top j bits fall out: x^128 =
        red = over << np.uint64(1)  # x^7 + x^2 + x + 1, so they come back as over * 0x87
        red ^= over
        red ^= over << np.uint64(2)
        red ^= over << np.uint64(7)
        np.left_shift(lo, _J, out=out[:, :, 0])
        out[:, :, 0] ^= red
        return self._t[: count * 64]

    def encrypt(self, sector: int, plain: bytes | bytearray | memoryview) -> bytes:
        """Ciphertext of whole sectors starting at `sector`."""
        return self._apply(self._enc, sector, plain)

    def decrypt(self, sector: int, data: bytes | bytearray | memoryview) -> bytes:
        return self._apply(self._dec, sector, data)

    def decrypt_into(self, sector: int, data: bytes | bytearray | memoryview,
                     out: memoryview) -> None:
        """Decrypt `data` straight into `out` (same length; e.g. a view of guest RAM)."""
        self._run(self._dec, sector, data, _words(out, len(data)))

    def encrypt_into(self, sector: int, data: bytes | bytearray | memoryview,
                     out: bytearray | memoryview) -> None:
        self._run(self._enc, sector, data, _words(out, len(data)))

    def _apply(self, ctx: CipherContext, sector: int,
               data: bytes | bytearray | memoryview) -> bytes:
        out = bytearray(len(data))
        self._run(ctx, sector, data, _words(out, len(data)))
        return bytes(out)

    def _run(self, ctx: CipherContext, sector: int, data: bytes | bytearray | memoryview,
             out: U64Array) -> None:
        n = len(data)
        step = MAX_SECTORS * SECTOR_SIZE
        src = np.frombuffer(data, dtype="<u8")
        for pos in range(0, n, step):
            m = min(step, n - pos)
            t = self.tweaks(sector + pos // SECTOR_SIZE, m // SECTOR_SIZE)
            x = self._x[: m // 8]
            np.bitwise_xor(src[pos // 8 : (pos + m) // 8], t, out=x)
            ctx.update_into(x.data.cast("B"), self._y)
            y = np.frombuffer(self._y, dtype="<u8", count=m // 8)
            np.bitwise_xor(y, t, out=out[pos // 8 : (pos + m) // 8])


def _words(out: bytearray | memoryview, n: int) -> U64Array:
    """`out` as uint64 words, after checking that it and the input are whole sectors."""
    if n % SECTOR_SIZE or len(out) != n:
        raise ValueError(f"{n} bytes (into {len(out)}) is not a whole number of "
                         f"{SECTOR_SIZE}-byte sectors of the same length")
    return np.frombuffer(out, dtype="<u8")
