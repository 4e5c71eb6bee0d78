"""Fetch Debian's cloud kernel and extract the vmlinux ELF from its bzImage.

`python -m isovisor.tools.guest_linux` (what `make guest-linux` runs):

1. resolve the metapackage `linux-image-cloud-amd64` to the package it depends on
   (`linux-image-<release>-cloud-amd64`) with `apt-cache show`;
2. `apt-get download` that package (nothing is installed);
3. take `boot/vmlinuz-<release>` out of the .deb with `dpkg-deb -x`;
4. find the compressed kernel inside the bzImage from its setup header (boot protocol
   >= 2.08: `payload_offset` at 0x248 and `payload_length` at 0x24c, relative to the
   protected-mode code at (setup_sects + 1) * 512), identify the format by its magic,
   decompress it, and check the result is an ELF64 x86-64 executable;
5. cache `vmlinuz-<release>`, `vmlinux-<release>`, the stable links `vmlinuz` and `vmlinux`,
   `SHA256SUMS` and `SOURCE` under cache/guest-linux/.

With the cache present a run only verifies it and prints where the files are.

Then the stock initramfs (`ensure_initramfs`): the kernel's virtio modules and whatever
they depend on (`kernel_modules.load_order`, from the modules' own `.modinfo` since the
package has no modules.dep) are copied from the same package, version pinned to the
cached kernel's, into `modules-<release>/` with their own SHA256SUMS, and
`initramfs-<release>.cpio.gz` (link `initramfs.cpio.gz`) is built from them and Debian's
busybox-static (`initramfs.build_stock_initramfs`). `--no-initramfs` skips this step.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import lzma
import os
import pwd
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from isovisor.tools import initramfs, kernel_modules

PROG = "guest-linux"
METAPACKAGE = "linux-image-cloud-amd64"
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO / "cache" / "guest-linux"
SUMS_FILE = "SHA256SUMS"
SOURCE_FILE = "SOURCE"

Log = Callable[[str], None]


class GuestLinuxError(Exception):
    """An expected failure (no network, unknown package, bad image): one line, exit 1."""


class NetworkError(GuestLinuxError):
    """The package registry could not be reached."""


class BzImageError(GuestLinuxError):
    """The bzImage or its payload is malformed or in a format this tool cannot read."""


# ---------------------------------------------------------------------------------------
# bzImage: the setup header and the compressed payload
# (Linux Documentation/arch/x86/boot.rst, "The real-mode kernel header")

OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_HEADER_MAGIC = 0x202
OFF_VERSION = 0x206
OFF_PAYLOAD_OFFSET = 0x248
OFF_PAYLOAD_LENGTH = 0x24C
SETUP_HEADER_END = 0x250
BOOT_FLAG = 0xAA55
HEADER_MAGIC = b"HdrS"
MIN_PROTOCOL = 0x208  # the first version with payload_offset / payload_length
SECTOR = 512
DEFAULT_SETUP_SECTS = 4  # "if this field is 0, the real value is 4"


@dataclass(frozen=True)
class CompressionFormat:
    name: str
    magic: bytes
    # The kernel build appends the uncompressed size as a little-endian u32 (size_append)
    # after every format but gzip, whose own trailer (ISIZE) ends with the same value.
    size_appended: bool


FORMATS: tuple[CompressionFormat, ...] = (
    CompressionFormat("gzip", b"\x1f\x8b", False),
    CompressionFormat("xz", b"\xfd7zXZ\x00", True),
    CompressionFormat("lzma", b"\x5d\x00\x00", True),
    CompressionFormat("bzip2", b"BZh", True),
    CompressionFormat("zstd", b"\x28\xb5\x2f\xfd", True),
    CompressionFormat("lz4", struct.pack("<I", 0x184C2102), True),  # LZ4 legacy frame
    CompressionFormat("lzo", b"\x89LZO", True),
)

# Formats Python's standard library cannot read: the command and its Debian package.
CLI_DECOMPRESSORS: dict[str, tuple[str, str]] = {
    "lz4": ("lz4", "lz4"),
    "zstd": ("zstd", "zstd"),
    "lzo": ("lzop", "lzop"),
}


@dataclass(frozen=True)
class Payload:
    """Where the compressed kernel lies in a bzImage (file offsets)."""

    protocol: int
    setup_sects: int
    offset: int
    length: int
    format: CompressionFormat

    @property
    def protocol_text(self) -> str:
        return f"{self.protocol >> 8}.{self.protocol & 0xFF:02d}"


def detect_format(head: bytes) -> CompressionFormat:
    """The compression format whose magic `head` starts with."""
    for fmt in FORMATS:
        if head.startswith(fmt.magic):
            return fmt
    raise BzImageError(
        f"unknown payload format: it starts with {head[:8].hex(' ')}, the magic of none of "
        + ", ".join(f.name for f in FORMATS)
    )


def locate_payload(image: bytes) -> Payload:
    """Parse the setup header of `image` and find its compressed payload."""
    if len(image) < SETUP_HEADER_END:
        raise BzImageError(
            f"image is {len(image)} bytes, too short for a bzImage setup header "
            f"(which ends at {SETUP_HEADER_END:#x})"
        )
    (boot_flag,) = struct.unpack_from("<H", image, OFF_BOOT_FLAG)
    if boot_flag != BOOT_FLAG:
        raise BzImageError(
            f"no boot flag {BOOT_FLAG:#06x} at {OFF_BOOT_FLAG:#x} (found {boot_flag:#06x}): "
            "not a bzImage"
        )
    magic = image[OFF_HEADER_MAGIC : OFF_HEADER_MAGIC + 4]
    if magic != HEADER_MAGIC:
        raise BzImageError(
            f"no 'HdrS' setup header magic at {OFF_HEADER_MAGIC:#x} (found {magic!r}): "
            "not a bzImage"
        )
    (protocol,) = struct.unpack_from("<H", image, OFF_VERSION)
    if protocol < MIN_PROTOCOL:
        raise BzImageError(
            f"boot protocol {protocol >> 8}.{protocol & 0xFF:02d} is older than 2.08, "
            "which has no payload_offset/payload_length"
        )
    setup_sects = image[OFF_SETUP_SECTS] or DEFAULT_SETUP_SECTS
    pm_start = (setup_sects + 1) * SECTOR
    payload_offset, payload_length = struct.unpack_from("<II", image, OFF_PAYLOAD_OFFSET)
    start = pm_start + payload_offset
    if payload_length == 0:
        raise BzImageError("payload_length is 0: the image carries no compressed kernel")
    if start + payload_length > len(image):
        raise BzImageError(
            f"payload at {start:#x} (setup_sects {setup_sects}, payload_offset "
            f"{payload_offset:#x}) with length {payload_length:#x} runs past the end of the "
            f"{len(image):#x}-byte image: truncated or corrupt header"
        )
    fmt = detect_format(image[start : start + 8])
    if fmt.size_appended and payload_length < len(fmt.magic) + 4:
        raise BzImageError(f"{fmt.name} payload of {payload_length} bytes is too short")
    return Payload(protocol, setup_sects, start, payload_length, fmt)


def _run_decompressor(fmt: CompressionFormat, data: bytes) -> bytes:
    command, package = CLI_DECOMPRESSORS[fmt.name]
    path = shutil.which(command)
    if path is None:
        raise BzImageError(
            f"a {fmt.name} payload needs the `{command}` command: apt-get install {package}"
        )
    proc = subprocess.run([path, "-dc"], input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        why = proc.stderr.decode(errors="replace").strip().splitlines()
        raise BzImageError(
            f"`{command} -dc` failed on the {fmt.name} payload (exit {proc.returncode})"
            + (f": {why[-1]}" if why else ": corrupt payload")
        )
    return proc.stdout


def decompress_payload(data: bytes, fmt: CompressionFormat) -> bytes:
    """Decompress a payload located by `locate_payload`; checks the recorded size."""
    (expected,) = struct.unpack_from("<I", data, len(data) - 4)
    body = data[:-4] if fmt.size_appended else data
    try:
        if fmt.name == "gzip":
            out = gzip.decompress(body)
        elif fmt.name == "xz":
            out = lzma.decompress(body, format=lzma.FORMAT_XZ)
        elif fmt.name == "lzma":
            out = lzma.decompress(body, format=lzma.FORMAT_ALONE)
        elif fmt.name == "bzip2":
            out = bz2.decompress(body)
        else:
            out = _run_decompressor(fmt, body)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
        if isinstance(exc, BzImageError):
            raise
        raise BzImageError(f"corrupt {fmt.name} payload: {exc}") from None
    if len(out) & 0xFFFF_FFFF != expected:
        raise BzImageError(
            f"{fmt.name} payload decompressed to {len(out)} bytes but the image records "
            f"{expected}: corrupt or truncated payload"
        )
    return out


@dataclass(frozen=True)
class ElfInfo:
    entry: int
    program_headers: int


EM_X86_64 = 62
ET_EXEC = 2


def check_vmlinux(elf: bytes) -> ElfInfo:
    """Check `elf` is an ELF64 little-endian x86-64 executable (what vmlinux is)."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF":
        raise BzImageError(f"decompressed payload is not an ELF file (starts {elf[:4].hex(' ')})")
    if elf[4] != 2 or elf[5] != 1:
        raise BzImageError("decompressed payload is not a 64-bit little-endian ELF")
    e_type, e_machine = struct.unpack_from("<HH", elf, 16)
    if e_machine != EM_X86_64:
        raise BzImageError(f"decompressed ELF is for machine {e_machine}, not x86-64 ({EM_X86_64})")
    if e_type != ET_EXEC:
        raise BzImageError(f"decompressed ELF has type {e_type}, not an executable ({ET_EXEC})")
    (entry,) = struct.unpack_from("<Q", elf, 24)
    (phnum,) = struct.unpack_from("<H", elf, 56)
    return ElfInfo(entry, phnum)


def extract_vmlinux(image: bytes, log: Log | None = None) -> bytes:
    """The vmlinux ELF inside bzImage `image`."""
    payload = locate_payload(image)
    if log:
        log(
            f"bzImage: boot protocol {payload.protocol_text}, setup_sects {payload.setup_sects}, "
            f"{payload.format.name} payload of {payload.length} bytes at {payload.offset:#x}"
        )
    data = image[payload.offset : payload.offset + payload.length]
    out = decompress_payload(data, payload.format)
    info = check_vmlinux(out)
    if log:
        log(
            f"vmlinux: {len(out)} bytes, ELF64 x86-64 executable, entry {info.entry:#x}, "
            f"{info.program_headers} program headers"
        )
    return out


# ---------------------------------------------------------------------------------------
# Debian: resolve, download, unpack


def _run(argv: Sequence[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, check=False,
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError:
        raise GuestLinuxError(
            f"`{argv[0]}` not found: this tool needs Debian's apt and dpkg"
        ) from None


def _apt_errors(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.startswith(("E:", "Err:"))]
    return "; ".join(lines) if lines else stderr.strip() or "no message"


_NETWORK_HINTS = ("Failed to fetch", "Could not resolve", "Could not connect",
                  "Temporary failure", "Network is unreachable", "Connection failed")


def resolve_package(name: str, apt_options: Sequence[str] = ()) -> tuple[str, str]:
    """(package, version) of the kernel image package `name` is or depends on."""
    opts = [a for o in apt_options for a in ("-o", o)]
    proc = _run(["apt-cache", *opts, "show", "--no-all-versions", name])
    if proc.returncode != 0 or not proc.stdout.strip():
        raise GuestLinuxError(
            f"package {name} not found in the apt lists ({_apt_errors(proc.stderr)}); "
            "is it spelled right, and has `apt-get update` run?"
        )
    fields = dict(re.findall(r"^([A-Za-z-]+): ?(.*)$", proc.stdout, re.MULTILINE))
    if re.fullmatch(r"linux-image-\d\S*", name):
        return name, fields.get("Version", "?")
    for dep in fields.get("Depends", "").split(","):
        m = re.match(r"\s*(linux-image-\d[^\s(|]*)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?", dep)
        if m:
            return m.group(1), m.group(2) or fields.get("Version", "?")
    raise GuestLinuxError(
        f"{name} depends on no linux-image-<release> package (Depends: "
        f"{fields.get('Depends', 'none')!r})"
    )


def _let_apt_sandbox_write(directory: Path) -> None:
    """apt-get download drops root for the user _apt, which must be able to write here."""
    if os.geteuid() != 0:
        return
    try:
        apt_uid = pwd.getpwnam("_apt").pw_uid
    except KeyError:
        return
    os.chown(directory, apt_uid, -1)


def download(package: str, directory: Path, apt_options: Sequence[str] = (),
             deb_name: str | None = None) -> Path:
    """`apt-get download package` into `directory`; the .deb's path. `package` may pin a
    version (`name=version`); `deb_name` is then the bare name the .deb starts with."""
    _let_apt_sandbox_write(directory)
    opts = [a for o in apt_options for a in ("-o", o)]
    proc = _run(["apt-get", *opts, "download", package], cwd=directory)
    if proc.returncode != 0:
        errors = _apt_errors(proc.stderr)
        if "Unable to locate package" in errors or "no installation candidate" in errors:
            raise GuestLinuxError(f"package {package} not found: {errors}")
        if any(h in proc.stderr for h in _NETWORK_HINTS):
            raise NetworkError(f"cannot download {package} (no network?): {errors}")
        raise GuestLinuxError(f"apt-get download {package} failed: {errors}")
    debs = sorted(directory.glob(f"{deb_name or package}_*.deb"))
    if len(debs) != 1:
        raise GuestLinuxError(f"apt-get download left {len(debs)} .deb files for {package}")
    return debs[0]


def extract_vmlinuz(deb: Path, directory: Path) -> tuple[str, Path]:
    """(release, path) of boot/vmlinuz-<release> unpacked from `deb` into `directory`."""
    proc = _run(["dpkg-deb", "-x", str(deb), str(directory)])
    if proc.returncode != 0:
        raise GuestLinuxError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()}")
    found = sorted((directory / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise GuestLinuxError(f"{deb.name} holds {len(found)} boot/vmlinuz-* files, not one")
    return found[0].name.removeprefix("vmlinuz-"), found[0]


# ---------------------------------------------------------------------------------------
# The cache


@dataclass(frozen=True)
class CachedKernel:
    release: str
    vmlinuz: Path
    vmlinux: Path
    source: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _link_atomic(path: Path, target: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, path)


def verify_cache(cache: Path) -> CachedKernel | None:
    """The cached kernel after checking SHA256SUMS; None when there is no complete cache."""
    sums = cache / SUMS_FILE
    vmlinuz, vmlinux = cache / "vmlinuz", cache / "vmlinux"
    if not (sums.is_file() and vmlinuz.is_file() and vmlinux.is_file()):
        return None
    listed: dict[str, str] = {}
    for line in sums.read_text().splitlines():
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](\S+)", line.strip())
        if not m:
            raise GuestLinuxError(f"{sums}: malformed line {line!r}; rerun with --force")
        listed[m.group(2)] = m.group(1)
    for link in (vmlinuz, vmlinux):
        name = link.resolve().name
        if name not in listed:
            raise GuestLinuxError(f"{link} -> {name} is not in {sums}; rerun with --force")
    for name, digest in listed.items():
        path = cache / name
        if not path.is_file():
            raise GuestLinuxError(f"{path} listed in {sums} is missing; rerun with --force")
        if sha256_file(path) != digest:
            raise GuestLinuxError(f"{path} does not match {sums}; rerun with --force")
    release = vmlinux.resolve().name.removeprefix("vmlinux-")
    source_file = cache / SOURCE_FILE
    source = source_file.read_text().strip() if source_file.is_file() else "unknown"
    return CachedKernel(release, vmlinuz.resolve(), vmlinux.resolve(), source)


def _fill_cache(
    cache: Path, package: str, version: str, release: str, vmlinuz: bytes, vmlinux: bytes
) -> CachedKernel:
    cache.mkdir(parents=True, exist_ok=True)
    files = {f"vmlinuz-{release}": vmlinuz, f"vmlinux-{release}": vmlinux}
    for name, data in files.items():
        _write_atomic(cache / name, data)
    _link_atomic(cache / "vmlinuz", f"vmlinuz-{release}")
    _link_atomic(cache / "vmlinux", f"vmlinux-{release}")
    source = f"{package} {version}"
    _write_atomic(cache / SOURCE_FILE, (source + "\n").encode())
    sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in files.items())
    _write_atomic(cache / SUMS_FILE, sums.encode())
    return CachedKernel(release, cache / f"vmlinuz-{release}", cache / f"vmlinux-{release}",
                        source)


def ensure_kernel(
    cache: Path = DEFAULT_CACHE,
    package: str = METAPACKAGE,
    *,
    force: bool = False,
    apt_options: Sequence[str] = (),
    log: Log = print,
) -> CachedKernel:
    """The cached Debian kernel, fetching and extracting it first when needed."""
    if not force:
        cached = verify_cache(cache)
        if cached is not None:
            log(f"cache verified against {cache / SUMS_FILE} ({cached.source})")
            return cached
    log(f"resolving {package} ...")
    real, version = resolve_package(package, apt_options)
    log(f"{package} -> {real} {version}")
    with tempfile.TemporaryDirectory(prefix="isovisor-guest-linux-") as tmp:
        work = Path(tmp)
        dl = work / "download"
        dl.mkdir()
        log(f"downloading {real} with apt-get download ...")
        deb = download(real, dl, apt_options)
        log(f"downloaded {deb.name} ({deb.stat().st_size} bytes)")
        release, vmlinuz_path = extract_vmlinuz(deb, work / "root")
        vmlinuz = vmlinuz_path.read_bytes()
        log(f"extracted boot/{vmlinuz_path.name} ({len(vmlinuz)} bytes)")
        vmlinux = extract_vmlinux(vmlinuz, log)
    kernel = _fill_cache(cache, real, version, release, vmlinuz, vmlinux)
    log(f"cached in {cache}")
    return kernel


# ---------------------------------------------------------------------------------------
# The stock initramfs: the kernel's virtio modules and busybox


@dataclass(frozen=True)
class GuestInitramfs:
    path: Path
    modules: tuple[str, ...]  # in the order /init loads them


def _verify_sums(directory: Path) -> bool:
    """True when `directory`/SHA256SUMS exists and every file it lists matches."""
    sums = directory / SUMS_FILE
    if not sums.is_file():
        return False
    for line in sums.read_text().splitlines():
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](\S+)", line.strip())
        if not m:
            raise GuestLinuxError(f"{sums}: malformed line {line!r}; rerun with --force")
        path = directory / m.group(2)
        if not path.is_file() or sha256_file(path) != m.group(1):
            raise GuestLinuxError(f"{path} does not match {sums}; rerun with --force")
    return True


def cache_modules(lib_modules: Path, dest: Path) -> list[str]:
    """Copy the guest modules' closure and modules.builtin from an unpacked package's
    lib/modules/<release> into `dest` (replaced atomically), with SHA256SUMS."""
    try:
        order = kernel_modules.load_order(kernel_modules.ModuleTree.scan(lib_modules),
                                          kernel_modules.GUEST_MODULES)
    except kernel_modules.ModuleError as exc:
        raise GuestLinuxError(str(exc)) from None
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    names = [m.path for m in order]
    if (lib_modules / "modules.builtin").is_file():
        names.append("modules.builtin")
    for rel in names:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lib_modules / rel, tmp / rel)
    (tmp / SUMS_FILE).write_text("".join(f"{sha256_file(tmp / n)}  {n}\n" for n in names))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return [m.name for m in order]


def ensure_modules(
    cache: Path, kernel: CachedKernel, *, force: bool = False,
    apt_options: Sequence[str] = (), log: Log = print,
) -> Path:
    """`modules-<release>/` in the cache, fetched from the kernel's own package (the same
    version) when missing."""
    dest = cache / f"modules-{kernel.release}"
    if not force and _verify_sums(dest):
        log(f"modules verified against {dest / SUMS_FILE}")
        return dest
    package, _, version = kernel.source.partition(" ")
    if not package.startswith("linux-image-"):
        package, version = f"linux-image-{kernel.release}", ""
    with tempfile.TemporaryDirectory(prefix="isovisor-guest-linux-") as tmp:
        work = Path(tmp)
        dl = work / "download"
        dl.mkdir()
        log(f"downloading {package} {version} for its modules ...")
        deb = download(f"{package}={version}" if version else package, dl, apt_options,
                       deb_name=package)
        proc = _run(["dpkg-deb", "-x", str(deb), str(work / "root")])
        if proc.returncode != 0:
            raise GuestLinuxError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()}")
        lib_modules = work / "root" / "lib" / "modules" / kernel.release
        if not lib_modules.is_dir():
            raise GuestLinuxError(f"{deb.name} has no lib/modules/{kernel.release}")
        names = cache_modules(lib_modules, dest)
    log(f"cached modules {' '.join(names)} in {dest}")
    return dest


def ensure_initramfs(
    cache: Path, kernel: CachedKernel, *, force: bool = False,
    apt_options: Sequence[str] = (), busybox: Path = initramfs.BUSYBOX, log: Log = print,
) -> GuestInitramfs:
    """Build `initramfs-<release>.cpio.gz` (and the link `initramfs.cpio.gz`) for the
    cached kernel: busybox, its virtio modules, the stock /init."""
    modules = ensure_modules(cache, kernel, force=force, apt_options=apt_options, log=log)
    out = cache / f"initramfs-{kernel.release}.cpio.gz"
    try:
        names = initramfs.build_stock_initramfs(out, modules, kernel.release, busybox)
    except initramfs.CpioError as exc:
        raise GuestLinuxError(str(exc)) from None
    _link_atomic(cache / "initramfs.cpio.gz", out.name)
    log(f"built {out.name}: /init loads {' '.join(names)}")
    return GuestInitramfs(out, tuple(names))


# ---------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m isovisor.tools.guest_linux",
        description="Fetch Debian's cloud kernel with `apt-get download` (nothing is "
        "installed), extract the vmlinux ELF from its bzImage, and cache both. With the "
        "cache present, only verify it. Exit status 0 on success, 1 on failure.",
    )
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help=f"where to cache the kernel (default {DEFAULT_CACHE})")
    p.add_argument("--package", default=METAPACKAGE,
                   help=f"kernel (meta)package to fetch (default {METAPACKAGE})")
    p.add_argument("--force", action="store_true", help="fetch again even if the cache is valid")
    p.add_argument("--apt-option", action="append", default=[], metavar="OPT",
                   help="pass `-o OPT` to apt-cache and apt-get (repeatable)")
    p.add_argument("--extract", type=Path, metavar="BZIMAGE",
                   help="only extract vmlinux from this bzImage (to --output), no apt")
    p.add_argument("--output", type=Path, metavar="FILE", help="output for --extract")
    p.add_argument("--no-initramfs", action="store_true",
                   help="only the kernel: no modules, no stock initramfs")
    return p


def _say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def _extract_only(image_path: Path, output: Path) -> None:
    try:
        image = image_path.read_bytes()
    except OSError as exc:
        raise GuestLinuxError(f"cannot read {image_path}: {exc.strerror}") from None
    vmlinux = extract_vmlinux(image, _say)
    _write_atomic(output, vmlinux)
    _say(f"wrote {output}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.extract is not None:
            if args.output is None:
                parser.error("--extract needs --output")
            _extract_only(args.extract, args.output)
            return 0
        kernel = ensure_kernel(
            args.cache_dir, args.package, force=args.force, apt_options=args.apt_option,
            log=_say,
        )
        initrd = None if args.no_initramfs else ensure_initramfs(
            args.cache_dir, kernel, force=args.force, apt_options=args.apt_option, log=_say,
        )
    except GuestLinuxError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    _say(f"kernel {kernel.release} ({kernel.source})")
    _say(f"bzImage: {args.cache_dir / 'vmlinuz'} -> {kernel.vmlinuz.name}")
    _say(f"vmlinux: {args.cache_dir / 'vmlinux'} -> {kernel.vmlinux.name}")
    if initrd is not None:
        _say(f"initramfs: {args.cache_dir / 'initramfs.cpio.gz'} -> {initrd.path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
