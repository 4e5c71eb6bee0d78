"""Build a tiny gzip-compressed newc initramfs around Debian's busybox-static.

`python -m isovisor.tools.initramfs OUT.cpio.gz` writes an archive holding /bin/busybox
(from the Debian package busybox-static, which the Makefile installs), links for the
applets /init uses, /dev/console, and an /init script that prints
`isovisor-initramfs: init running` on the console and powers the machine off.

The newc ("new ASCII") cpio format, as the kernel's initramfs unpacker reads it
(Documentation/driver-api/early-userspace/buffer-format.rst): per entry a 110-byte header,
"070701" then 13 fields of 8 hex digits (ino, mode, uid, gid, nlink, mtime, filesize,
devmajor, devminor, rdevmajor, rdevminor, namesize including the NUL, check), the name
and its NUL padded to 4 bytes, the data padded to 4 bytes; the entry "TRAILER!!!" ends it.
Output is reproducible: fixed inode numbers, owner root, mtime 0 (or SOURCE_DATE_EPOCH).
"""

from __future__ import annotations

import argparse
import gzip
import os
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

PROG = "initramfs"
BUSYBOX = Path("/bin/busybox")
MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER = "TRAILER!!!"
INIT_MESSAGE = "isovisor-initramfs: init running"

INIT_SCRIPT = f"""#!/bin/sh
# isovisor test initramfs: say we ran, then power off.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
echo "{INIT_MESSAGE}"
/bin/busybox poweroff -f
"""

APPLETS = ("sh", "echo", "mount", "poweroff", "reboot", "cat", "ls")


class CpioError(Exception):
    """A malformed archive or an entry that cannot be written."""


@dataclass(frozen=True)
class Entry:
    name: str  # without a leading "/"
    mode: int  # file type and permission bits, as in st_mode
    data: bytes = b""  # file contents, or a symlink's target
    rdev: tuple[int, int] = (0, 0)  # (major, minor) for device nodes
    uid: int = 0
    gid: int = 0
    mtime: int = 0


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def regular(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(fields: Sequence[int]) -> bytes:
    for value in fields:
        if not 0 <= value <= 0xFFFF_FFFF:
            raise CpioError(f"header field {value} does not fit in 8 hex digits")
    return MAGIC + b"".join(b"%08X" % v for v in fields)


def _entry_bytes(entry: Entry, ino: int, mtime: int) -> bytes:
    name = entry.name.lstrip("/").encode() + b"\0"
    if name == b"\0":
        raise CpioError("empty entry name")
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, entry.uid, entry.gid, nlink, entry.mtime or mtime,
              len(entry.data), 0, 0, entry.rdev[0], entry.rdev[1], len(name), 0)
    head = _header(fields) + name
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))


def write_newc(entries: Iterable[Entry], mtime: int = 0) -> bytes:
    """An uncompressed newc archive of `entries`, in order, ending with the trailer."""
    parts: list[bytes] = []
    seen: set[str] = set()
    for ino, entry in enumerate(entries, start=1):
        if entry.name in seen:
            raise CpioError(f"duplicate entry {entry.name!r}")
        seen.add(entry.name)
        parts.append(_entry_bytes(entry, ino, mtime))
    parts.append(_entry_bytes(Entry(TRAILER, 0), 0, 0))
    return b"".join(parts)


def read_newc(archive: bytes) -> list[Entry]:
    """The entries of an uncompressed newc archive, up to its trailer."""
    entries: list[Entry] = []
    pos = 0
    while True:
        if pos + HEADER_SIZE > len(archive):
            raise CpioError(f"truncated header at offset {pos}")
        if archive[pos : pos + 6] != MAGIC:
            raise CpioError(f"bad magic {archive[pos:pos + 6]!r} at offset {pos}")
        try:
            f = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise CpioError(f"non-hex header field at offset {pos}") from None
        _ino, mode, uid, gid, _nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, _ck = f
        name_end = pos + HEADER_SIZE + namesize
        if namesize == 0 or name_end > len(archive) or archive[name_end - 1] != 0:
            raise CpioError(f"bad name at offset {pos}")
        name = archive[pos + HEADER_SIZE : name_end - 1].decode()
        data_start = name_end + (-name_end % 4)
        data_end = data_start + size
        if data_end > len(archive):
            raise CpioError(f"entry {name!r} runs past the end of the archive")
        if name == TRAILER:
            return entries
        entries.append(Entry(name, mode, archive[data_start:data_end], (rmaj, rmin),
                             uid, gid, mtime))
        pos = data_end + (-data_end % 4)


def initramfs_entries(busybox: bytes, init_script: str = INIT_SCRIPT) -> list[Entry]:
    """The standard test initramfs: busybox, applet links, /dev/console, /init."""
    entries = [directory(d) for d in ("bin", "sbin", "dev", "proc", "sys", "tmp", "etc")]
    entries.append(char_device("dev/console", 5, 1))
    entries.append(char_device("dev/null", 1, 3, 0o666))
    entries.append(regular("bin/busybox", busybox, 0o755))
    entries.extend(symlink(f"bin/{a}", "busybox") for a in APPLETS)
    entries.append(regular("init", init_script.encode(), 0o755))
    return entries


def build_initramfs(out: Path, busybox: Path = BUSYBOX,
                    init_script: str = INIT_SCRIPT) -> int:
    """Write the gzip-compressed initramfs to `out`; its size in bytes."""
    try:
        binary = busybox.read_bytes()
    except OSError as exc:
        raise CpioError(
            f"cannot read {busybox} ({exc.strerror}): apt-get install busybox-static"
        ) from None
    if binary[:4] != b"\x7fELF":
        raise CpioError(f"{busybox} is not an ELF executable")
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    archive = write_newc(initramfs_entries(binary, init_script), mtime)
    data = gzip.compress(archive, compresslevel=9, mtime=0)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return len(data)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m isovisor.tools.initramfs",
        description="Write a gzip-compressed newc initramfs with Debian's busybox-static and "
        f"an /init that prints '{INIT_MESSAGE}' and powers off.",
    )
    p.add_argument("out", type=Path, metavar="OUT.cpio.gz", help="archive to write")
    p.add_argument("--busybox", type=Path, default=BUSYBOX,
                   help=f"static busybox binary (default {BUSYBOX})")
    args = p.parse_args(argv)
    try:
        size = build_initramfs(args.out, args.busybox)
    except (CpioError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {args.out} ({size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
