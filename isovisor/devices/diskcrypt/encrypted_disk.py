"""An encrypted raw image: what the guest sees is plaintext, what the file holds is
AES-XTS-256 ciphertext, sector by sector (xts.py), so the host-side image never holds
plaintext.

`EncryptedDisk` is a `Disk` whose data paths go through a private buffer:

- read: pread the ciphertext into the buffer, decrypt straight into the guest's buffer
  (one guest buffer, the usual case: when the sectors are in the page cache, one native
  call does both, xts.py `read_decrypt_cached`) or decrypt and scatter (several);
- write: encrypt from the guest's buffers (each plaintext byte is read once, so a guest
  changing its buffer meanwhile only changes what it wrote) and pwrite the ciphertext;
- WRITE_ZEROES: encrypted zeros are written (never a hole: a hole reads as zeros of
  ciphertext, which would decrypt to noise, and would show the host which sectors the
  guest zeroed); the unmap flag is a hint and is not taken;
- DISCARD: a no-op (allowed, §5.2.6.2: discard is a hint). Punching holes would tell the
  host which sectors are free, as dm-crypt's `allow_discards` does, so it is off.

O_DIRECT is refused with a key (the bounce buffer here is not aligned for it). The key
(64 bytes: K1 then K2) lives only in this process's memory; nothing here writes it.
"""

from __future__ import annotations

import mmap
import os

from isovisor.devices.diskcrypt.xts import (
    SECTOR_SIZE,
    SectorCipher,
    XtsKeyError,
    XtsNativeError,
)
from isovisor.devices.virtio.blk_disk import Disk, DiskError, DiskSpec

CHUNK = 1 << 20  # ciphertext bytes per pread/pwrite: bounds host memory per request


class EncryptedDisk(Disk):
    """A Disk whose image holds AES-XTS-256 ciphertext (the key comes in `spec.key`)."""

    def __init__(self, fd: int, spec: DiskSpec, size: int, serial: bytes) -> None:
        super().__init__(fd, spec, size, serial)
        if spec.key is None:
            raise DiskError(f"disk {spec.path}: an encrypted disk needs a key")
        if spec.direct:
            raise DiskError(f"disk {spec.path}: O_DIRECT (direct) is not supported on an "
                            "encrypted disk")
        try:
            self.cipher = SectorCipher(spec.key)
        except (XtsKeyError, XtsNativeError) as exc:
            raise DiskError(f"disk {spec.path}: {exc}") from None
        # Page-aligned (an anonymous mapping, not a bytearray, whose data starts 16 bytes
        # into a page): the kernel's copy from the page cache into a buffer misaligned
        # against its source pages measured ~4x slower on this host (AMD, rep movsb).
        self._cbuf = mmap.mmap(-1, CHUNK)

    def read_into(self, views: list[memoryview], offset: int, total: int,
                  aligned: bool) -> None:
        buf = memoryview(self._cbuf)
        if len(views) == 1 and total <= CHUNK:  # the usual case: one read, one decrypt
            chunk = buf[:total]
            if self.cipher.read_decrypt_cached(self.fd, offset, chunk, views[0]):
                return  # it was in the page cache: one native call did both
            _pread_full(self.fd, chunk, offset)
            self.cipher.decrypt_into(offset // SECTOR_SIZE, chunk, views[0])
            return
        single = len(views) == 1
        done = 0
        while done < total:
            n = min(total - done, CHUNK)
            chunk = buf[:n]
            _pread_full(self.fd, chunk, offset + done)
            sector = (offset + done) // SECTOR_SIZE
            if single:
                self.cipher.decrypt_into(sector, chunk, views[0][done : done + n])
            else:
                _scatter(views, done, self.cipher.decrypt(sector, chunk))
            done += n

    def write_from(self, views: list[memoryview], offset: int, total: int,
                   aligned: bool) -> None:
        self._check_writable()
        # one buffer (the usual case) is encrypted straight from guest RAM; several are
        # joined into a private copy first
        plain = views[0] if len(views) == 1 else memoryview(b"".join(views))
        buf = memoryview(self._cbuf)
        done = 0
        while done < total:
            n = min(total - done, CHUNK)
            self.cipher.encrypt_into((offset + done) // SECTOR_SIZE, plain[done : done + n],
                                     buf[:n])
            _pwrite_full(self.fd, buf[:n], offset + done)
            done += n

    def discard(self, offset: int, length: int) -> None:
        """A hint that is not taken (see the module docstring)."""
        self._check_writable()

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._check_writable()
        zeros = bytes(min(length, CHUNK))
        done = 0
        while done < length:
            n = min(length - done, CHUNK)
            ct = self.cipher.encrypt((offset + done) // SECTOR_SIZE, zeros[:n])
            _pwrite_full(self.fd, ct, offset + done)
            done += n

    def close(self) -> None:
        super().close()
        if not self._cbuf.closed:
            self._cbuf[:] = bytes(len(self._cbuf))  # the last plaintext-adjacent buffer
            self._cbuf.close()
        self.cipher.close()  # wipes the AES key schedules (EVP_CIPHER_CTX_free)


def _pread_full(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise OSError(5, f"end of disk at offset {offset + done}")
        done += n


def _pwrite_full(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _scatter(views: list[memoryview], pos: int, data: bytes) -> None:
    """Copy `data` into `views` seen as one stream, from byte `pos` of that stream."""
    src = memoryview(data)
    done = 0
    for v in views:
        if done == len(src):
            return
        if pos >= len(v):
            pos -= len(v)
            continue
        n = min(len(v) - pos, len(src) - done)
        v[pos : pos + n] = src[done : done + n]
        done += n
        pos = 0
