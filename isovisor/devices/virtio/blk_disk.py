"""The host side of a virtio-blk device: a raw disk image behind one open fd.

`DiskSpec` is what a user asks for; `Disk.open` turns it into an fd (O_RDONLY for a
read-only disk, so no code path can write it), checks the image (a regular file or block
device, a whole number of 512-byte sectors) and takes a lock on it (an exclusive flock
for a writable disk, a shared one for a read-only disk), every failure one sentence that
names the path.

I/O is preadv/pwritev straight between the file and memoryviews of guest RAM (the views
come from GuestMemory; this module never sees an address). With `direct`, the fd is opened
O_DIRECT; the kernel then wants buffers, file offsets and lengths aligned to the device's
logical block size, which `DIRECT_ALIGN` (4 KiB, the largest in use) always satisfies.
Requests that are not aligned go through an aligned bounce buffer instead: reads read
the enclosing aligned range and copy out; writes read the partial head and tail blocks,
merge, and write the aligned range back (one I/O thread per device: no other request
runs in between).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from isovisor.devices.ratelimit import BucketSpec

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
DIRECT_ALIGN = 4096
BOUNCE_SIZE = 1 << 20  # bounce/zero buffer: bounds host memory per request
IOV_MAX = 1024  # Linux's UIO_MAXIOV: at most this many buffers per preadv/pwritev
SERIAL_BYTES = 20  # §5.2.6: VIRTIO_BLK_ID_BYTES

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

# Bounce-buffer callbacks: (byte position in the request, the piece of the buffer).
Sink = Callable[[int, memoryview], None]


class DiskError(Exception):
    """A disk image cannot be used; the message names the path and says why."""


@dataclass(frozen=True)
class DiskSpec:
    """One `--disk`: a raw image, optionally read-only, O_DIRECT, with a GET_ID serial,
    rate limits (bytes of data per second, requests per second; None: unlimited) and an
    encryption key (never in repr)."""

    path: Path
    readonly: bool = False
    direct: bool = False
    serial: str | None = None  # at most 20 ASCII characters; None: derived from the inode
    bandwidth: BucketSpec | None = None
    ops: BucketSpec | None = None
    # An AES-XTS-256 key (64 bytes): the image holds ciphertext (diskcrypt.EncryptedDisk).
    key: bytes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.serial is not None:
            s = self.serial
            if len(s) > SERIAL_BYTES or not s.isascii() or not s.isprintable():
                raise ValueError(
                    f"disk {self.path}: serial {self.serial!r} must be at most "
                    f"{SERIAL_BYTES} printable ASCII characters"
                )


class Disk:
    """An open raw image. Not thread-safe: one device I/O thread uses it."""

    def __init__(self, fd: int, spec: DiskSpec, size: int, serial: bytes) -> None:
        self.fd = fd
        self.spec = spec
        self.size = size
        self.serial = serial.ljust(SERIAL_BYTES, b"\0")[:SERIAL_BYTES]
        self.readonly = spec.readonly
        self.direct = spec.direct
        self.bounced = 0  # requests that went through the bounce buffer
        self._bounce: mmap.mmap | None = None  # page-aligned, allocated on first use

    @property
    def path(self) -> Path:
        return self.spec.path

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors."""
        return self.size // SECTOR_SIZE

    @classmethod
    def open(cls, spec: DiskSpec) -> Disk:
        path = spec.path
        # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below, and
        # the flag is cleared again for a disk).
        flags = (os.O_RDONLY if spec.readonly else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK
        if spec.direct:
            flags |= os.O_DIRECT
        mode = "read-only" if spec.readonly else "read-write"
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise DiskError(f"disk {path} does not exist") from None
        except PermissionError:
            raise DiskError(f"disk {path}: permission denied (opening it {mode})") from None
        except IsADirectoryError:
            raise DiskError(f"disk {path} is a directory, not a disk image") from None
        except OSError as exc:
            if spec.direct and exc.errno == errno.EINVAL:
                raise DiskError(f"disk {path}: its file system does not support O_DIRECT") from None
            raise DiskError(f"disk {path}: cannot open it {mode}: {exc.strerror}") from None
        try:
            return cls._checked(fd, spec)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def from_fd(cls, fd: int, spec: DiskSpec) -> Disk:
        """An image its caller already opened as `spec` says (the jailed worker: the host
        side opened it); the same checks and lock as `open`. Takes ownership of `fd`,
        closing it on failure too. `spec.path` only names the disk in messages."""
        try:
            return cls._checked(fd, spec)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _checked(cls, fd: int, spec: DiskSpec) -> Disk:
        path = spec.path
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise DiskError(f"disk {path} is a directory, not a disk image")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise DiskError(f"disk {path} is not a regular file or block device")
        os.set_blocking(fd, True)
        size = os.lseek(fd, 0, os.SEEK_END)  # a block device's st_size is 0
        if size == 0:
            raise DiskError(f"disk {path} is empty")
        if size % SECTOR_SIZE:
            raise DiskError(f"disk {path} is {size} bytes, not a multiple of {SECTOR_SIZE}")
        if spec.direct and size % DIRECT_ALIGN:
            raise DiskError(
                f"disk {path} is {size} bytes; O_DIRECT needs a multiple of {DIRECT_ALIGN}"
            )
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if spec.readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DiskError(f"disk {path} is in use by another VM or process (locked)") from None
        if spec.serial is not None:
            serial = spec.serial.encode("ascii")
        else:  # stable per image, like Firecracker's: device and inode numbers
            serial = f"{st.st_dev:x}{st.st_rdev:x}{st.st_ino:x}".encode()[:SERIAL_BYTES]
        return cls(fd, spec, size, serial)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also drops the flock
            self.fd = -1
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    # --- data -----------------------------------------------------------------------

    def read_into(
        self, views: list[memoryview], offset: int, total: int, aligned: bool
    ) -> None:
        """Fill `views` (`total` bytes) from the disk at `offset` (OSError on failure).
        `aligned`: every view suits O_DIRECT (only looked at with `direct`)."""
        if self.direct and not (aligned and _is_aligned(offset, total)):
            self.bounced += 1
            self._bounce_read(offset, total, _scatter_to(views))
            return
        n = os.preadv(self.fd, views, offset)  # the usual case: all at once
        if n != total:
            _full_io(os.preadv, self.fd, views, offset, n)

    def write_from(
        self, views: list[memoryview], offset: int, total: int, aligned: bool
    ) -> None:
        """Write `views` (`total` bytes) to the disk at `offset` (OSError on failure)."""
        self._check_writable()
        if self.direct and not (aligned and _is_aligned(offset, total)):
            self.bounced += 1
            self._bounce_write(offset, total, _gather_from(views))
            return
        n = os.pwritev(self.fd, views, offset)
        if n != total:
            _full_io(os.pwritev, self.fd, views, offset, n)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole; a file system that cannot is fine (discard is a hint, §5.2.6.2)."""
        self._check_writable()
        err = _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        if err not in (0, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENODEV):
            raise OSError(err, os.strerror(err))

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero a range: a punched hole (unmap allowed) or ZERO_RANGE, else zeros written."""
        self._check_writable()
        mode = _FALLOC_FL_PUNCH_HOLE if unmap else _FALLOC_FL_ZERO_RANGE
        err = _fallocate(self.fd, mode | _FALLOC_FL_KEEP_SIZE, offset, length)
        if err == 0:
            return
        if err not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENODEV):
            raise OSError(err, os.strerror(err))
        if self.direct:  # O_DIRECT wants aligned buffers: the bounce path has one
            self._bounce_write(offset, length, _zeros)
            return
        zeros = memoryview(bytes(min(length, BOUNCE_SIZE)))
        pos, end = offset, offset + length
        while pos < end:
            n = min(end - pos, len(zeros))
            _full_io(os.pwritev, self.fd, [zeros[:n]], pos)
            pos += n

    # --- O_DIRECT bounce ---------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.readonly:  # the fd is O_RDONLY anyway: this is the clearer error
            raise OSError(errno.EROFS, f"disk {self.path} is read-only")

    def _buffer(self) -> mmap.mmap:
        if self._bounce is None:
            self._bounce = mmap.mmap(-1, BOUNCE_SIZE)  # anonymous: page-aligned, zeroed
        return self._bounce

    def _bounce_read(self, offset: int, total: int, sink: Sink) -> None:
        """Read [offset, offset+total) through aligned chunks; `sink(pos, data)` takes each
        piece (pos counts from the start of the request)."""
        buf = memoryview(self._buffer())
        done = 0
        while done < total:
            start = offset + done
            a_start = start - start % DIRECT_ALIGN
            n = min(total - done, len(buf) - (start - a_start))
            a_end = _round_up(start + n, DIRECT_ALIGN)
            _full_io(os.preadv, self.fd, [buf[: a_end - a_start]], a_start)
            sink(done, buf[start - a_start : start - a_start + n])
            done += n

    def _bounce_write(self, offset: int, total: int, source: Sink) -> None:
        """Write [offset, offset+total) through aligned chunks, reading the partial head and
        tail blocks first; `source(pos, dest)` fills each piece."""
        buf = memoryview(self._buffer())
        done = 0
        while done < total:
            start = offset + done
            a_start = start - start % DIRECT_ALIGN
            n = min(total - done, len(buf) - (start - a_start))
            a_end = _round_up(start + n, DIRECT_ALIGN)
            head_partial = start != a_start
            if head_partial:
                _full_io(os.preadv, self.fd, [buf[:DIRECT_ALIGN]], a_start)
            tail = a_end - DIRECT_ALIGN
            if (start + n) % DIRECT_ALIGN and not (head_partial and tail == a_start):
                at = tail - a_start
                _full_io(os.preadv, self.fd, [buf[at : at + DIRECT_ALIGN]], tail)
            source(done, buf[start - a_start : start - a_start + n])
            _full_io(os.pwritev, self.fd, [buf[: a_end - a_start]], a_start)
            done += n


# --- helpers -------------------------------------------------------------------------


def _round_up(x: int, align: int) -> int:
    return (x + align - 1) // align * align


def _is_aligned(offset: int, length: int) -> bool:
    return offset % DIRECT_ALIGN == 0 and length % DIRECT_ALIGN == 0


def _zeros(_pos: int, dest: memoryview) -> None:
    dest[:] = bytes(len(dest))


def _scatter_to(views: Sequence[memoryview]) -> Sink:
    """sink(pos, data): copy `data` into `views` seen as one stream, from byte `pos`."""

    def sink(pos: int, data: memoryview) -> None:
        _copy_stream(views, pos, data, into_views=True)

    return sink


def _gather_from(views: Sequence[memoryview]) -> Sink:
    def source(pos: int, dest: memoryview) -> None:
        _copy_stream(views, pos, dest, into_views=False)

    return source


def _copy_stream(
    views: Sequence[memoryview], pos: int, buf: memoryview, *, into_views: bool
) -> None:
    done = 0
    for v in views:
        if done == len(buf):
            return
        if pos >= len(v):
            pos -= len(v)
            continue
        n = min(len(v) - pos, len(buf) - done)
        if into_views:
            v[pos : pos + n] = buf[done : done + n]
        else:
            buf[done : done + n] = v[pos : pos + n]
        done += n
        pos = 0


def _full_io(
    op: Callable[[int, list[memoryview], int], int],
    fd: int,
    views: list[memoryview],
    offset: int,
    done: int = 0,
) -> None:
    """preadv/pwritev until every byte moved, resuming after `done` bytes (short transfers
    resume where they ended); EOF before the end is an OSError (the image shrank)."""
    views = _advance(views, done)
    offset += done
    while views:
        batch = views[:IOV_MAX]
        want = sum(len(v) for v in batch)
        n = op(fd, batch, offset)
        if n == 0 and want:
            raise OSError(errno.EIO, f"end of disk at offset {offset}")
        offset += n
        views = views[len(batch):] if n == want else _advance(views, n)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """`views` without their first `n` bytes."""
    i = 0
    while n and i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n and rest:
        rest = [rest[0][n:], *rest[1:]]
    return rest


def _fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2); 0 or the errno. SAFETY: integer arguments only, no buffers."""
    ret = _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length))
    return 0 if ret == 0 else ctypes.get_errno()
