"""The AES-XTS-256 of `SectorCipher` (the native library, xts_native.c: see
test_xts_native.py for the proof that it is the one doing the work) against two
references, byte for byte: `cryptography`'s XTS
mode (OpenSSL) sector by sector with the plain64 tweak (dm-crypt's aes-xts-plain64: the
sector number, 128-bit little-endian), and a textbook IEEE 1619 implementation written
here from the standard (AES on single blocks, the tweak doubled in GF(2^128) with Python
integers)."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from isovisor.devices.diskcrypt.xts import SectorCipher, XtsKeyError

U64_MAX = (1 << 64) - 1


def openssl_xts(key: bytes, sector: int, data: bytes, encrypt: bool) -> bytes:
    out = b""
    for i in range(len(data) // 512):
        c = Cipher(algorithms.AES(key), modes.XTS((sector + i).to_bytes(16, "little")))
        ctx = c.encryptor() if encrypt else c.decryptor()
        out += ctx.update(data[i * 512 : (i + 1) * 512]) + ctx.finalize()
    return out


def textbook_xts_encrypt(key: bytes, sector: int, data: bytes) -> bytes:
    """IEEE 1619-2007 §5.3.1 for whole 16-byte blocks: T = E_K2(i) (x) alpha^j,
    C = E_K1(P xor T) xor T."""
    k1 = Cipher(algorithms.AES(key[:32]), modes.ECB()).encryptor()
    k2 = Cipher(algorithms.AES(key[32:]), modes.ECB()).encryptor()
    out = bytearray()
    for s in range(len(data) // 512):
        t = int.from_bytes(k2.update((sector + s).to_bytes(16, "little")), "little")
        for j in range(32):
            p = int.from_bytes(data[s * 512 + j * 16 : s * 512 + j * 16 + 16], "little")
            x = (p ^ t).to_bytes(16, "little")
            out += (int.from_bytes(k1.update(x), "little") ^ t).to_bytes(16, "little")
            t <<= 1  # multiply by alpha: x^128 = x^7 + x^2 + x + 1
            if t >> 128:
                t = (t & ((1 << 128) - 1)) ^ 0x87
    return bytes(out)


keys = st.binary(min_size=64, max_size=64).filter(lambda k: k[:32] != k[32:])
sectors = st.one_of(st.integers(0, 1 << 20), st.integers(U64_MAX - 64, U64_MAX - 8))


@settings(max_examples=60, deadline=None)
@given(key=keys, sector=sectors, n=st.integers(1, 8), data=st.data())
def test_matches_openssl_xts_sector_by_sector(key: bytes, sector: int, n: int,
                                              data: st.DataObject) -> None:
    plain = data.draw(st.binary(min_size=512 * n, max_size=512 * n))
    c = SectorCipher(key)
    ct = c.encrypt(sector, plain)
    assert ct == openssl_xts(key, sector, plain, encrypt=True)
    assert c.decrypt(sector, ct) == plain
    assert c.decrypt(sector, plain) == openssl_xts(key, sector, plain, encrypt=False)
    out = bytearray(len(ct))
    c.decrypt_into(sector, ct, memoryview(out))
    assert bytes(out) == plain


def test_matches_the_textbook_definition_at_both_ends_of_the_sector_range() -> None:
    key = os.urandom(64)
    for sector in (0, 1, 255, 256, 1 << 32, U64_MAX - 3):
        plain = os.urandom(4 * 512)
        assert SectorCipher(key).encrypt(sector, plain) == textbook_xts_encrypt(
            key, sector, plain)


def test_every_tweak_bit_pattern_carries_correctly() -> None:
    """Tweaks whose top bits are set exercise the reduction (the 0x87 fold) at every j:
    search sector numbers until E_K2(sector) has its top bit set in both 64-bit words."""
    key = os.urandom(64)
    k2 = Cipher(algorithms.AES(key[32:]), modes.ECB()).encryptor()
    hits = [s for s in range(400)
            if k2.update(s.to_bytes(16, "little"))[15] & 0x80][:8]
    assert len(hits) >= 4
    for s in hits:
        plain = os.urandom(512)
        assert SectorCipher(key).encrypt(s, plain) == openssl_xts(key, s, plain, True)


def test_a_large_request_is_one_call_and_still_exact() -> None:
    key, plain = os.urandom(64), os.urandom(1 << 20)
    assert SectorCipher(key).encrypt(77, plain) == openssl_xts(key, 77, plain, True)


@pytest.mark.parametrize(("key", "why"), [
    (b"k" * 63, "64 bytes, not 63"),
    (b"k" * 32, "64 bytes, not 32"),
    (b"a" * 32 + b"a" * 32, "halves"),
])
def test_bad_keys_are_refused_with_the_reason(key: bytes, why: str) -> None:
    with pytest.raises(XtsKeyError, match=why):
        SectorCipher(key)


def test_partial_sectors_and_sector_overflow_are_refused() -> None:
    c = SectorCipher(os.urandom(64))
    with pytest.raises(ValueError, match="whole number"):
        c.encrypt(0, b"x" * 100)
    with pytest.raises(ValueError, match="64-bit"):
        c.encrypt(U64_MAX, b"x" * 1024)
