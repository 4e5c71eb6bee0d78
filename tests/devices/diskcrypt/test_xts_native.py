"""The native AES-XTS library (isovisor/devices/diskcrypt/xts_native.c) is what encrypts:
one call per request, loaded with no numpy; a missing or wrong build is refused with an
error naming `make native`; lengths and sectors are checked in Python before the call and
again in C, and nothing outside the output buffer is written."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from isovisor.devices.diskcrypt import xts_native_lib as native
from isovisor.devices.diskcrypt.encrypted_disk import EncryptedDisk
from isovisor.devices.diskcrypt.xts import SectorCipher, XtsNativeError
from isovisor.devices.virtio.blk_disk import DiskError, DiskSpec
from tests.devices.diskcrypt.test_xts import openssl_xts

U64_MAX = (1 << 64) - 1


class CountingLib:
    def __init__(self, crypt: Any) -> None:
        self.crypt, self.calls = crypt, 0

    def __call__(self, *args: Any) -> int:
        self.calls += 1
        return int(self.crypt(*args))


def test_a_request_is_one_native_call_and_matches_openssl() -> None:
    key, plain = os.urandom(64), os.urandom(1 << 20)
    c = SectorCipher(key)
    counter = CountingLib(c._crypt)
    c._crypt = counter
    ct = c.encrypt(9, plain)
    assert counter.calls == 1
    assert ct == openssl_xts(key, 9, plain, encrypt=True)
    out = bytearray(len(ct))
    c.decrypt_into(9, memoryview(ct), memoryview(out))
    assert counter.calls == 2 and bytes(out) == plain


def test_the_library_is_mapped_and_numpy_is_not_imported() -> None:
    code = ("import sys; import isovisor.devices.virtio.blk; "
            "from isovisor.devices.diskcrypt.xts import SectorCipher; "
            "SectorCipher(bytes(range(64))).encrypt(0, bytes(512)); "
            "maps = open('/proc/self/maps').read(); "
            "print('numpy' in sys.modules, sys.argv[1] in maps)")
    r = subprocess.run([sys.executable, "-c", code, str(native.LIBRARY_PATH.resolve())],
                       capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.split() == ["False", "True"], r.stdout + r.stderr


def test_a_missing_library_is_refused_naming_the_make_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(XtsNativeError, match="missing: build it with `make native`"):
        native.load(tmp_path / "libisovisor_xts.so")
    # an encrypted disk then fails to open, saying why (no slow fallback)
    err = XtsNativeError(f"{tmp_path}/libisovisor_xts.so is missing: build it with "
                         "`make native`")
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "_error", err)
    with pytest.raises(XtsNativeError, match="make native"):
        SectorCipher(os.urandom(64))
    image = tmp_path / "enc.img"
    image.write_bytes(bytes(4096))
    with pytest.raises(DiskError, match=r"enc\.img: .*make native"):
        EncryptedDisk.open(DiskSpec(image, key=os.urandom(64)))


def test_a_library_without_the_functions_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.c").write_text("int unrelated(void) { return 0; }\n")
    lib = tmp_path / "libisovisor_xts.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "empty.c")],
                   check=True, timeout=60)
    with pytest.raises(XtsNativeError, match=r"cannot be loaded.*make native"):
        native.load(lib)


def test_a_library_giving_wrong_ciphertext_is_refused_by_the_known_answer(
        tmp_path: Path) -> None:
    src = tmp_path / "fake.c"
    src.write_text("#include <stddef.h>\n#include <stdint.h>\n"
                   "static int h;\nvoid *isx_new(const unsigned char *k) { (void)k; "
                   "return &h; }\nvoid isx_free(void *p) { (void)p; }\n"
                   "int isx_crypt(void *p, int e, const unsigned char *i, unsigned char *o, "
                   "size_t n, uint64_t s) { (void)p; (void)e; (void)s; "
                   "for (size_t k = 0; k < n; k++) o[k] = i[k] ^ 1; return 0; }\n"
                   "int isx_read_decrypt(void) { return -3; }\n")
    lib = tmp_path / "libisovisor_xts.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True,
                   timeout=60)
    with pytest.raises(XtsNativeError, match="wrong AES-XTS output"):
        native.load(lib)


def test_bad_lengths_and_outputs_are_refused_before_the_call() -> None:
    c = SectorCipher(os.urandom(64))
    for data, out in ((bytes(1024), bytearray(512)), (bytes(1000), bytearray(1000)),
                      (bytes(512), bytearray(1024))):
        with pytest.raises(ValueError, match="whole number"):
            c.encrypt_into(0, data, out)
    with pytest.raises(ValueError, match="writable"):
        c.decrypt_into(0, bytes(512), memoryview(bytes(512)))
    with pytest.raises(ValueError, match="64-bit"):
        c.encrypt(U64_MAX - 1, bytes(3 * 512))
    with pytest.raises(ValueError, match="64-bit"):
        c.encrypt(-1, bytes(512))
    assert c.encrypt(U64_MAX - 2, bytes(3 * 512))  # the last sectors still work
    c.close()
    with pytest.raises(ValueError, match="closed"):
        c.encrypt(0, bytes(512))


def test_nothing_outside_the_output_is_written() -> None:
    key = os.urandom(64)
    c = SectorCipher(key)
    arena = bytearray(b"\xee" * (64 + 4096 + 64))
    plain = os.urandom(4096)
    c.encrypt_into(3, memoryview(plain), memoryview(arena)[64:-64])
    assert arena[:64] == b"\xee" * 64 and arena[-64:] == b"\xee" * 64
    assert bytes(arena[64:-64]) == openssl_xts(key, 3, plain, encrypt=True)
    # in place (input and output the same buffer)
    view = memoryview(arena)[64:-64]
    c.decrypt_into(3, view, view)
    assert bytes(view) == plain and arena[:64] == arena[-64:] == b"\xee" * 64


def test_the_c_code_checks_lengths_and_sectors_itself() -> None:
    lib = native.library()
    h = lib.isx_new(os.urandom(64))
    try:
        buf = ctypes.create_string_buffer(b"\x11" * 1024, 1024)
        for n, sector in ((100, 0), (1000, 0), (1024, U64_MAX)):
            assert lib.isx_crypt(h, 1, buf, buf, n, sector) == -1
        assert lib.isx_crypt(None, 1, buf, buf, 512, 0) == -1
        assert lib.isx_crypt(h, 1, None, buf, 512, 0) == -1
        assert buf.raw == b"\x11" * 1024  # refused calls write nothing
        assert lib.isx_crypt(h, 1, buf, buf, 1024, U64_MAX - 1) == 0
        assert lib.isx_new(None) is None
    finally:
        lib.isx_free(h)


def test_a_read_is_one_native_call_from_the_page_cache_and_falls_back_off_it(
        tmp_path: Path) -> None:
    key = os.urandom(64)
    plain = os.urandom(64 * 512)
    image = tmp_path / "enc.img"
    image.write_bytes(SectorCipher(key).encrypt(0, plain))
    fd = os.open(image, os.O_RDONLY)
    try:
        c = SectorCipher(key)
        scratch, out = bytearray(8 * 512), bytearray(8 * 512)
        os.pread(fd, len(plain), 0)  # in the page cache
        assert c.read_decrypt_cached(fd, 16 * 512, scratch, out)
        assert bytes(out) == plain[16 * 512 : 24 * 512]
        with pytest.raises(ValueError, match="whole sectors"):
            c.read_decrypt_cached(fd, 100, scratch, out)
        with pytest.raises(ValueError, match="whole sectors"):
            c.read_decrypt_cached(fd, 0, bytearray(512), out)
        # past the end of the file: not the fast path (the caller's read reports it)
        out[:] = b"\x77" * len(out)
        assert not c.read_decrypt_cached(fd, 60 * 512, scratch, out)
        assert out == b"\x77" * len(out)
        # out of the page cache (RWF_NOWAIT refuses to wait): False, out untouched ...
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        if not c.read_decrypt_cached(fd, 32 * 512, scratch, out):
            assert out == b"\x77" * len(out)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        # ... and the disk's read still returns the plaintext either way
        disk = EncryptedDisk.open(DiskSpec(image, key=key, readonly=True))
        try:
            dst = bytearray(8 * 512)
            disk.read_into([memoryview(dst)], 40 * 512, len(dst), False)
            assert bytes(dst) == plain[40 * 512 : 48 * 512]
        finally:
            disk.close()
    finally:
        os.close(fd)
