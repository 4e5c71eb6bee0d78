"""TAP network backend: a Linux TAP interface opened through /dev/net/tun.

The file descriptor is opened non-blocking with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, so
every frame read or written is preceded by a virtio-net header; TUNSETVNETHDRSZ makes it
the 12-byte VERSION_1 header (with num_buffers), which is exactly the guest's layout, so a
frame moves between guest buffers and the TAP with readv/writev and no reformatting. The
kernel writes only the first 10 bytes of that header on reads (the device fills in
num_buffers) and ignores the last 2 on writes.

Offloads (TUNSETOFFLOAD) tell the kernel what the reader accepts: partial checksums and
GSO packets. They start off and the device turns on only what its driver negotiated.

`open_tap(name)` attaches to an existing TAP (`ip tuntap add dev NAME mode tap`, made by
the host); `open_tap(name, create=True)` may create a transient one that disappears when
the descriptor closes. The interface is looked up in the calling thread's network
namespace, or with `netns=NAME` in the named one (/run/netns/NAME: the daemon keeps its
tenant networks there); the descriptor works from any namespace afterwards. Errors
become a TapError with one sentence naming the TAP and what to do.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import socket
import struct
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TypeVar

TUN_DEVICE = "/dev/net/tun"
# struct virtio_net_hdr_v1 (virtio 1.2 §5.1.6): the header with num_buffers.
VNET_HEADER_SIZE = 12

# <linux/if_tun.h>: _IOW('T', n, int) / _IOR('T', n, unsigned int)
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNGETVNETHDRSZ = 0x800454D7
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
# TUNSETOFFLOAD bits: what the reader (the guest, through us) accepts.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in the union
assert _IFREQ.size == 40
_INT = struct.Struct("i")


class TapError(Exception):
    """A TAP could not be opened or configured (one sentence, names the TAP)."""


def check_name(name: str) -> str:
    """An interface name Linux accepts: 1-15 bytes, no '/', ':' or whitespace."""
    raw = name.encode("utf-8", "surrogateescape")
    if not 0 < len(raw) < IFNAMSIZ or name in (".", "..") or any(
        ch in name for ch in "/: \t\n\r\0"
    ):
        raise TapError(f"TAP name {name!r} is not a valid interface name (1-15 characters)")
    return name


def _ioctl_ifreq(fd: int, request: int, name: str, flags: int) -> tuple[str, int]:
    buf = bytearray(_IFREQ.pack(name.encode(), flags))
    # SAFETY: `buf` is a 40-byte struct ifreq, the size these requests read and write;
    # fcntl.ioctl passes a copy of it and copies the kernel's result back.
    fcntl.ioctl(fd, request, buf)
    raw_name, out_flags = _IFREQ.unpack(buf)
    return raw_name.rstrip(b"\0").decode(errors="replace"), out_flags


class Tap:
    """An open TAP: a non-blocking fd with 12-byte virtio-net headers on every frame."""

    def __init__(self, name: str, fd: int, *, ufo: bool) -> None:
        self.name = name
        self._fd = fd
        self.ufo = ufo  # the kernel accepts TUN_F_UFO (GSO_UDP towards the guest)
        self.offloads = 0
        self._finalizer = weakref.finalize(self, os.close, fd)

    @property
    def fd(self) -> int:
        if not self._finalizer.alive:
            raise TapError(f"TAP {self.name} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def set_offloads(self, flags: int) -> None:
        """TUNSETOFFLOAD: the TUN_F_* the reader accepts (0: full frames, full checksums)."""
        try:
            # SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned long).
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        except OSError as exc:
            raise TapError(f"TAP {self.name}: TUNSETOFFLOAD {flags:#x}: {exc.strerror}") from None
        self.offloads = flags

    def readv(self, buffers: Sequence[memoryview | bytearray]) -> int | None:
        """One frame (header first) into `buffers`; None when no frame is waiting. The
        return value is the frame's full size, which exceeds the buffers' total when the
        kernel truncated it."""
        try:
            return os.readv(self.fd, buffers)
        except BlockingIOError:
            return None
        except InterruptedError:
            return None

    def writev(self, buffers: Sequence[memoryview | bytes]) -> int:
        """One frame (header first); OSError as the kernel reports it."""
        return os.writev(self.fd, buffers)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_error(name: str, exc: OSError) -> TapError:
    if exc.errno == errno.EPERM:
        return TapError(
            f"TAP {name}: permission denied (needs CAP_NET_ADMIN, or a TAP owned by this "
            "user: `ip tuntap add dev NAME mode tap user USER`)"
        )
    if exc.errno == errno.EBUSY:
        return TapError(f"TAP {name} is already in use by another process")
    if exc.errno == errno.EINVAL:
        return TapError(f"{name} exists but is not a TAP interface (a TUN, or another kind)")
    return TapError(f"TAP {name}: {exc.strerror or exc}")


NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_NETNS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_T = TypeVar("_T")


def check_netns_name(name: str) -> str:
    """A network namespace name as `ip netns` makes them (a file in /run/netns)."""
    if not _NETNS_NAME.match(name):
        raise TapError(f"network namespace name {name!r} is invalid (letters, digits, '.', "
                       "'_' and '-', at most 64)")
    return name


def in_netns(netns: str, fn: Callable[[], _T]) -> _T:
    """Run `fn` in a short-lived thread that has joined network namespace `netns`
    (/run/netns/NAME); its result or its exception. The caller's namespace is untouched."""
    check_netns_name(netns)
    result: list[_T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            try:
                fd = os.open(f"{NETNS_DIR}/{netns}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise TapError(f"network namespace {netns}: {exc.strerror or exc}") from None
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise TapError(f"cannot enter network namespace {netns}: "
                                   f"{os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    t = threading.Thread(target=body, name=f"netns-{netns}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def open_tap(name: str, *, create: bool = False, netns: str | None = None) -> Tap:
    """Attach to TAP `name` in the calling thread's network namespace, or in `netns`.

    Without `create`, the interface must exist already (the host made it); with it, a
    missing TAP is created, transient: it goes away when the Tap is closed."""
    check_name(name)
    if netns is not None:
        return in_netns(netns, lambda: open_tap(name, create=create))
    if not create:
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise TapError(
                f"TAP {name} does not exist (create it: `ip tuntap add dev {name} mode tap`)"
            ) from None
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TapError(f"{TUN_DEVICE} is missing (load the tun module)") from None
    except PermissionError:
        raise TapError(f"{TUN_DEVICE}: permission denied") from None
    try:
        try:
            got, flags = _ioctl_ifreq(fd, TUNSETIFF, name, TAP_FLAGS)
        except OSError as exc:
            raise _open_error(name, exc) from None
        if got != name or flags & (IFF_TAP | IFF_TUN) != IFF_TAP:
            raise TapError(f"TAP {name}: the kernel attached {got!r} with flags {flags:#x}")
        _, flags = _ioctl_ifreq(fd, TUNGETIFF, "", 0)
        if flags & TAP_FLAGS != TAP_FLAGS:
            raise TapError(f"TAP {name}: flags {flags:#x} lack IFF_TAP|IFF_NO_PI|IFF_VNET_HDR")
        size = bytearray(_INT.pack(VNET_HEADER_SIZE))
        # SAFETY: TUNSETVNETHDRSZ and TUNGETVNETHDRSZ read/write one int through a pointer;
        # `size` is 4 bytes.
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, size)
        fcntl.ioctl(fd, TUNGETVNETHDRSZ, size)
        if _INT.unpack(size)[0] != VNET_HEADER_SIZE:
            raise TapError(f"TAP {name}: the kernel kept another virtio-net header size")
        ufo = _probe_offload(fd, TUN_F_CSUM | TUN_F_UFO)
        # SAFETY: TUNSETOFFLOAD takes its argument by value. Offloads start off.
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
    except TapError:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        raise TapError(f"TAP {name}: {exc.strerror or exc}") from None
    return Tap(name, fd, ufo=ufo)


def _probe_offload(fd: int, flags: int) -> bool:
    try:
        # SAFETY: TUNSETOFFLOAD takes its argument by value.
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError:
        return False
    return True
