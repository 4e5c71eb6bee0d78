"""The stock-kernel tools without the network: bzImage parsing, payload formats, the cache,
apt output parsing, and the newc cpio writer behind the test initramfs."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from isovisor.tools import guest_linux as gl
from isovisor.tools import initramfs as ir

ENTRY = 0x1000000


def fake_vmlinux(machine: int = gl.EM_X86_64, body: int = 5000) -> bytes:
    """An ELF64 x86-64 executable header followed by compressible filler."""
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack(
        "<HHIQQQIHHHHHH", gl.ET_EXEC, machine, 1, ENTRY, 64, 0, 0, 64, 56, 3, 64, 0, 0
    )
    return header + bytes(range(256)) * (body // 256) + b"vmlinux end"


def with_size(data: bytes, size: int) -> bytes:
    return data + struct.pack("<I", size)


def compress_cli(argv: list[str], data: bytes) -> bytes:
    if shutil.which(argv[0]) is None:
        pytest.skip(f"`{argv[0]}` is not installed (Debian package {argv[0]})")
    return subprocess.run(argv, input=data, capture_output=True, check=True).stdout


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda d: gzip.compress(d, mtime=0),
    "xz": lambda d: with_size(lzma.compress(d, format=lzma.FORMAT_XZ), len(d)),
    "lzma": lambda d: with_size(lzma.compress(d, format=lzma.FORMAT_ALONE), len(d)),
    "bzip2": lambda d: with_size(bz2.compress(d), len(d)),
    "lz4": lambda d: with_size(compress_cli(["lz4", "-l", "-c"], d), len(d)),
    "zstd": lambda d: with_size(compress_cli(["zstd", "-q", "-c"], d), len(d)),
}


def make_bzimage(
    payload: bytes,
    *,
    setup_sects: int = 27,
    protocol: int = 0x20F,
    payload_offset: int = 0x3C4,
    tail: int = 100,
) -> bytes:
    """A bzImage skeleton: real-mode setup, then protected-mode code holding `payload`."""
    sects = setup_sects or gl.DEFAULT_SETUP_SECTS
    pm_start = (sects + 1) * gl.SECTOR
    image = bytearray(pm_start + payload_offset)
    image += payload + b"\xcc" * tail
    image[gl.OFF_SETUP_SECTS] = setup_sects
    struct.pack_into("<H", image, gl.OFF_BOOT_FLAG, gl.BOOT_FLAG)
    image[gl.OFF_HEADER_MAGIC : gl.OFF_HEADER_MAGIC + 4] = gl.HEADER_MAGIC
    struct.pack_into("<H", image, gl.OFF_VERSION, protocol)
    struct.pack_into("<II", image, gl.OFF_PAYLOAD_OFFSET, payload_offset, len(payload))
    return bytes(image)


# --- payload locator and formats ---------------------------------------------------------


@pytest.mark.parametrize("setup_sects", [27, 39, 0])
def test_locates_payload_from_setup_header(setup_sects: int) -> None:
    payload = COMPRESSORS["gzip"](fake_vmlinux())
    found = gl.locate_payload(make_bzimage(payload, setup_sects=setup_sects))
    sects = setup_sects or 4  # 0 means 4
    assert found.setup_sects == sects
    assert found.offset == (sects + 1) * 512 + 0x3C4
    assert found.length == len(payload)
    assert found.format.name == "gzip"
    assert found.protocol_text == "2.15"


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_extracts_vmlinux_from_each_format(name: str) -> None:
    elf = fake_vmlinux()
    image = make_bzimage(COMPRESSORS[name](elf))
    assert gl.locate_payload(image).format.name == name
    assert gl.extract_vmlinux(image) == elf


def test_lz4_legacy_magic_is_recognised() -> None:
    assert gl.detect_format(struct.pack("<I", 0x184C2102) + b"\0\0\0\0").name == "lz4"
    assert gl.detect_format(b"\x28\xb5\x2f\xfd\0").name == "zstd"
    assert gl.detect_format(b"\xfd7zXZ\0\0").name == "xz"


def test_unknown_payload_magic_is_a_clear_error() -> None:
    image = make_bzimage(b"\x11\x22\x33\x44" + bytes(60))
    with pytest.raises(gl.BzImageError, match=r"unknown payload format: it starts with 11 22 33"):
        gl.locate_payload(image)


def test_wrong_payload_offset_lands_on_no_known_magic() -> None:
    image = bytearray(make_bzimage(COMPRESSORS["gzip"](fake_vmlinux())))
    struct.pack_into("<I", image, gl.OFF_PAYLOAD_OFFSET, 0x3C4 - 16)  # points into zeros
    with pytest.raises(gl.BzImageError, match="unknown payload format"):
        gl.locate_payload(bytes(image))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:0x240], r"too short for a bzImage setup header"),
        (lambda b: b[:0x1FE] + b"\0\0" + b[0x200:], r"no boot flag 0xaa55"),
        (lambda b: b[:0x202] + b"Hdrs" + b[0x206:], r"no 'HdrS' setup header magic"),
        (lambda b: b[:0x206] + b"\x07\x02" + b[0x208:], r"boot protocol 2\.07 is older than 2\.08"),
        (lambda b: b[:len(b) - 200], r"runs past the end of the .*-byte image: truncated"),
        (lambda b: b[:0x24C] + bytes(4) + b[0x250:], r"payload_length is 0"),
        (lambda b: b[:0x248] + b"\xff\xff\xff\x7f" + b[0x24C:], r"runs past the end"),
    ],
    ids=["short", "boot-flag", "hdrs", "old-protocol", "truncated", "no-payload", "offset"],
)
def test_bad_headers_give_clear_errors(
    mutate: Callable[[bytes], bytes], message: str
) -> None:
    image = make_bzimage(COMPRESSORS["gzip"](fake_vmlinux()))
    with pytest.raises(gl.BzImageError, match=message):
        gl.locate_payload(mutate(image))


@pytest.mark.parametrize("name", ["gzip", "xz", "lz4"])
def test_corrupt_payload_is_a_clear_error(name: str) -> None:
    payload = bytearray(COMPRESSORS[name](fake_vmlinux()))
    for i in range(12, len(payload) - 8, 7):
        payload[i] ^= 0x5A
    with pytest.raises(gl.BzImageError, match=rf"(corrupt|failed).*{name}|{name}.*corrupt"):
        gl.extract_vmlinux(make_bzimage(bytes(payload)))


def test_recorded_size_must_match() -> None:
    elf = fake_vmlinux()
    payload = with_size(lzma.compress(elf, format=lzma.FORMAT_XZ), len(elf) + 1)
    with pytest.raises(gl.BzImageError, match=r"decompressed to \d+ bytes but the image records"):
        gl.extract_vmlinux(make_bzimage(payload))


def test_payload_that_is_not_an_x86_64_elf_is_rejected() -> None:
    with pytest.raises(gl.BzImageError, match="not an ELF file"):
        gl.extract_vmlinux(make_bzimage(gzip.compress(b"just text" * 20)))
    with pytest.raises(gl.BzImageError, match="machine 183, not x86-64"):
        gl.extract_vmlinux(make_bzimage(gzip.compress(fake_vmlinux(machine=183))))


def test_check_vmlinux_reports_entry() -> None:
    info = gl.check_vmlinux(fake_vmlinux())
    assert (info.entry, info.program_headers) == (ENTRY, 3)


# --- command line: --extract --------------------------------------------------------------


def test_extract_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    elf = fake_vmlinux()
    image = tmp_path / "vmlinuz"
    image.write_bytes(make_bzimage(COMPRESSORS["xz"](elf)))
    out = tmp_path / "vmlinux"
    assert gl.main(["--extract", str(image), "--output", str(out)]) == 0
    assert out.read_bytes() == elf
    printed = capsys.readouterr().out
    assert "xz payload" in printed and f"entry {ENTRY:#x}" in printed


def test_extract_command_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"MZ" + bytes(100))
    assert gl.main(["--extract", str(bad), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("guest-linux: error: ") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# --- the cache ----------------------------------------------------------------------------


def test_cache_is_verified_and_reused_without_apt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rel = "6.1.0-99-cloud-amd64"
    gl._fill_cache(tmp_path, "linux-image-" + rel, "6.1.999-1", rel, b"bz" * 100, fake_vmlinux())
    assert (tmp_path / "vmlinux").resolve().name == f"vmlinux-{rel}"
    sums = (tmp_path / gl.SUMS_FILE).read_text()
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", gl.SUMS_FILE], cwd=tmp_path, check=True)

    def no_apt(*_a: object, **_k: object) -> tuple[str, str]:
        raise AssertionError("apt must not be asked when the cache is valid")

    monkeypatch.setattr(gl, "resolve_package", no_apt)
    log: list[str] = []
    kernel = gl.ensure_kernel(tmp_path, log=log.append)
    assert kernel.release == rel and kernel.vmlinux == tmp_path / f"vmlinux-{rel}"
    assert kernel.source == f"linux-image-{rel} 6.1.999-1"
    assert any("cache verified" in line for line in log)

    (tmp_path / f"vmlinux-{rel}").write_bytes(b"tampered")
    with pytest.raises(gl.GuestLinuxError, match=r"does not match .*SHA256SUMS; rerun with"):
        gl.ensure_kernel(tmp_path, log=log.append)
    assert (tmp_path / gl.SUMS_FILE).read_text() == sums


def test_empty_cache_means_fetch(tmp_path: Path) -> None:
    assert gl.verify_cache(tmp_path / "nothing") is None


# --- apt output parsing -------------------------------------------------------------------


def fake_run(stdout: str, stderr: str = "", rc: int = 0) -> Callable[..., object]:
    def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(argv, rc, stdout, stderr)

    return run


def test_resolves_metapackage_to_its_image(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gl, "_run", fake_run(
        "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n"
        "Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n"
    ))
    assert gl.resolve_package(gl.METAPACKAGE) == ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")


def test_unknown_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gl, "_run", fake_run("", "E: No packages found\n", 100))
    with pytest.raises(gl.GuestLinuxError, match=r"package nope not found.*No packages found"):
        gl.resolve_package("nope")


def test_download_without_network_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gl, "_run", fake_run(
        "", "E: Failed to fetch http://deb.debian.org/x.deb  Could not resolve 'deb.debian.org'\n",
        100,
    ))
    with pytest.raises(gl.NetworkError, match=r"cannot download linux-image-x \(no network\?\)"):
        gl.download("linux-image-x", tmp_path)


def test_missing_apt_is_a_clear_error() -> None:
    with pytest.raises(gl.GuestLinuxError, match="not found: this tool needs Debian's apt"):
        gl._run(["/nonexistent/apt-cache", "show"])


# --- newc cpio ----------------------------------------------------------------------------


def sample_entries() -> list[ir.Entry]:
    return [
        ir.directory("bin"),
        ir.regular("bin/tool", b"\x7fELF" + bytes(range(200)), 0o755),  # not 4-aligned
        ir.symlink("bin/sh", "tool"),
        ir.char_device("dev/console", 5, 1),
        ir.regular("a", b"x"),
        ir.regular("empty", b""),
    ]


def test_newc_round_trip_and_alignment() -> None:
    entries = sample_entries()
    archive = ir.write_newc(entries)
    assert archive.startswith(b"070701") and len(archive) % 4 == 0
    assert b"TRAILER!!!\0" in archive[-128:]
    back = ir.read_newc(archive)
    assert [(e.name, e.mode, e.data, e.rdev) for e in back] == [
        (e.name, e.mode, e.data, e.rdev) for e in entries
    ]
    assert stat.S_ISCHR(back[3].mode) and back[3].rdev == (5, 1)


def test_newc_reader_rejects_damage() -> None:
    archive = ir.write_newc(sample_entries())
    with pytest.raises(ir.CpioError, match="bad magic"):
        ir.read_newc(b"070707" + archive[6:])
    with pytest.raises(ir.CpioError, match=r"truncated|runs past"):
        ir.read_newc(archive[:200])
    with pytest.raises(ir.CpioError, match="duplicate"):
        ir.write_newc([ir.regular("a", b""), ir.regular("a", b"")])


def system_cpio() -> list[str] | None:
    if shutil.which("cpio"):
        return ["cpio", "-t", "--quiet"]
    if shutil.which("busybox"):
        return ["busybox", "cpio", "-t"]
    return None


def test_system_cpio_lists_our_archive() -> None:
    argv = system_cpio()
    if argv is None:
        pytest.skip("neither cpio nor busybox is installed; the own reader covered the format")
    listed = subprocess.run(argv, input=ir.write_newc(sample_entries()), capture_output=True,
                            check=True).stdout.decode().split()
    assert listed == [e.name for e in sample_entries()]


def test_initramfs_has_busybox_and_init(tmp_path: Path) -> None:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF" + b"fake busybox" * 10)
    out = tmp_path / "initramfs.cpio.gz"
    ir.build_initramfs(out, busybox)
    entries = {e.name: e for e in ir.read_newc(gzip.decompress(out.read_bytes()))}
    assert entries["bin/busybox"].data == busybox.read_bytes()
    assert entries["bin/busybox"].mode == stat.S_IFREG | 0o755
    assert entries["bin/sh"].data == b"busybox" and stat.S_ISLNK(entries["bin/sh"].mode)
    assert entries["dev/console"].rdev == (5, 1)
    init = entries["init"]
    assert init.mode == stat.S_IFREG | 0o755
    text = init.data.decode()
    assert text.startswith("#!/bin/sh\n")
    assert ir.INIT_MESSAGE in text and "poweroff -f" in text
    ir.build_initramfs(tmp_path / "again.cpio.gz", busybox)
    assert (tmp_path / "again.cpio.gz").read_bytes() == out.read_bytes()  # reproducible


def test_initramfs_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not ir.BUSYBOX.is_file():
        pytest.skip(f"{ir.BUSYBOX} is missing: the Makefile installs busybox-static")
    out = tmp_path / "i.cpio.gz"
    assert ir.main([str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    argv = system_cpio()
    if argv is not None:
        listed = subprocess.run(argv, input=gzip.decompress(out.read_bytes()),
                                capture_output=True, check=True).stdout.decode().split()
        assert {"init", "bin/busybox", "dev/console"} <= set(listed)
    assert ir.main([str(tmp_path / "no" / "dir" / "x.gz")]) == 1
    assert ir.main([str(out), "--busybox", str(tmp_path / "missing")]) == 1
    assert "apt-get install busybox-static" in capsys.readouterr().err
