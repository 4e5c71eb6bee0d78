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

The *stock* initramfs (`build_stock_initramfs`, what `make guest-linux` builds beside
Debian's cloud kernel) adds the kernel's own virtio modules under
/lib/modules/<release>/ with a modules.dep, in the load order `kernel_modules.load_order`
computes, and an /init that loads them, mounts the virtio-blk disk /dev/vda (ext4), reads
the file `isovisor-marker` from it and writes `isovisor-guest-wrote`, lists the network
interfaces, prints an `isovisor-initramfs: ...` line for each step and resets the
machine (`reboot -f`: with no ACPI sleep states a power-off would only halt the vCPU). That
kernel builds virtio_mmio as a module, so only this userspace can find our devices.
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

from isovisor.tools import kernel_modules as km

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

APPLETS = ("sh", "echo", "mount", "umount", "poweroff", "reboot", "cat", "ls", "insmod",
           "mknod", "sleep", "sync")

MARK = "isovisor-initramfs:"
DISK_MARKER = "isovisor-marker"  # a file the test puts on the disk; /init prints it
GUEST_WROTE = "isovisor-guest-wrote"  # a file /init writes to the disk
GUEST_WROTE_TEXT = "written by the stock kernel's virtio_blk"


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


def _sh_word(text: str) -> str:
    """`text` as one safe shell word (module paths are plain; refuse anything else)."""
    if not text or any(not (c.isalnum() or c in "/._-") for c in text):
        raise CpioError(f"{text!r} is not a plain path")
    return text


def stock_init_script(release: str, modules: Sequence[tuple[str, str]]) -> str:
    """/init for the stock kernel: `modules` are (name, path under lib/modules/<release>)
    in load order. Each step prints a line starting with MARK."""
    moddir = f"/lib/modules/{_sh_word(release)}"
    loads = "".join(f"load {_sh_word(n)} {moddir}/{_sh_word(p)}\n" for n, p in modules)
    return f"""#!/bin/sh
# isovisor stock-kernel initramfs: load the virtio modules, use the disk, report, power off.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "{MARK} init running"
load() {{
    if insmod "$2"; then echo "{MARK} loaded $1"; else echo "{MARK} insmod $1 failed"; fi
}}
{loads}echo "{MARK} modules loaded"
n=0
while [ ! -e /sys/block/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
if [ -e /sys/block/vda ]; then
    if [ ! -b /dev/vda ]; then
        IFS=: read major minor < /sys/block/vda/dev
        mknod /dev/vda b "$major" "$minor"
    fi
    if mount -t ext4 /dev/vda /mnt; then
        echo "{MARK} mounted /dev/vda"
        echo "{MARK} marker $(cat /mnt/{DISK_MARKER})"
        echo "{GUEST_WROTE_TEXT}" > /mnt/{GUEST_WROTE}
        sync
        umount /mnt && echo "{MARK} unmounted /dev/vda"
    else
        echo "{MARK} mount /dev/vda failed"
    fi
else
    echo "{MARK} no /dev/vda"
fi
for dev in /sys/class/net/*; do echo "{MARK} net ${{dev##*/}}"; done
echo "{MARK} done"
# isovisor's machine has no ACPI sleep states, so a power-off would only halt the vCPU:
# reset instead (the i8042 reset line ends the VMM with status 0, as panic=-1 does).
reboot -f
"""


def stock_initramfs_entries(
    busybox: bytes, release: str, modules: Sequence[tuple[str, str, bytes]], modules_dep: str
) -> list[Entry]:
    """The standard entries plus /mnt, the modules (name, path under
    lib/modules/<release>, contents) with every parent directory, modules.dep, and the
    stock /init."""
    script = stock_init_script(release, [(n, p) for n, p, _ in modules])
    entries = [e for e in initramfs_entries(busybox, script) if e.name != "init"]
    entries.append(directory("mnt"))
    root = f"lib/modules/{_sh_word(release)}"
    dirs: list[str] = []
    for _name, path, _data in modules:
        parts = f"{root}/{_sh_word(path)}".split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.append(d)
    entries.extend(directory(d) for d in dirs)
    entries.extend(regular(f"{root}/{path}", data) for _n, path, data in modules)
    entries.append(regular(f"{root}/modules.dep", modules_dep.encode()))
    entries.append(regular("init", script.encode(), 0o755))
    return entries


def _gzip_atomic(out: Path, entries: list[Entry]) -> int:
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0") or 0)
    data = gzip.compress(write_newc(entries, mtime), compresslevel=9, mtime=0)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return len(data)


def _read_busybox(busybox: Path) -> bytes:
    try:
        binary = busybox.read_bytes()
    except OSError as exc:
        raise CpioError(
            f"cannot read {busybox} ({exc.strerror}): apt-get install busybox-static"
        ) from None
    if binary[:4] != b"\x7fELF":
        raise CpioError(f"{busybox} is not an ELF executable")
    return binary


def build_stock_initramfs(out: Path, modules_root: Path, release: str,
                          busybox: Path = BUSYBOX) -> list[str]:
    """Write the stock-kernel initramfs to `out` from the modules under `modules_root`
    (lib/modules/<release>, or a copy holding at least the guest modules and
    modules.builtin); the module names in the order /init loads them."""
    binary = _read_busybox(busybox)
    try:
        tree = km.ModuleTree.scan(modules_root)
        order = km.load_order(tree, km.GUEST_MODULES)
        modules = [(m.name, m.path, (modules_root / m.path).read_bytes()) for m in order]
    except km.ModuleError as exc:
        raise CpioError(str(exc)) from None
    _gzip_atomic(out, stock_initramfs_entries(binary, release, modules, km.modules_dep(order)))
    return [m.name for m in order]


def build_initramfs(out: Path, busybox: Path = BUSYBOX,
                    init_script: str = INIT_SCRIPT) -> int:
    """Write the gzip-compressed initramfs to `out`; its size in bytes."""
    return _gzip_atomic(out, initramfs_entries(_read_busybox(busybox), init_script))


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
