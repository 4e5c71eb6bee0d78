"""Boot the spec-only PVH guest (guests/independent) in stock QEMU.

The guest in guests/independent/ was written from the public PVH boot ABI
alone (Xen's docs/misc/pvh.pandoc, start_info.h, elfnote.h), without reading
isovisor.  Booting it in QEMU's microvm (a reference PVH loader) proves that
the guest and its output contract are sound, so the same ELF can then be used
to check that isovisor's PVH loader conforms to the spec rather than only to
our own guests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.kvm]

REPO = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO / "guests" / "independent"
ELF = GUEST_DIR / "build" / "pvh-spec-guest.elf"
QEMU = "qemu-system-x86_64"
PREFIX = "pvh-spec-guest: "
CMDLINE = "spec test 123"
# 23 bytes: deliberately not a multiple of 4 or 8.
INITRD = b"\x7fPVH\x00\xff\x10\x20-independent-ird\n"
BOOT_TIMEOUT_S = 60


@dataclass
class Boot:
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [ln.strip() for ln in self.stdout.splitlines() if ln.strip().startswith(PREFIX)]

    def line(self, pattern: str) -> re.Match[str]:
        rx = re.compile(re.escape(PREFIX) + pattern)
        for ln in self.lines:
            m = rx.fullmatch(ln)
            if m:
                return m
        raise AssertionError(f"no line matching {pattern!r} in guest output:\n{self.stdout}")


NOT_RUN = "SKIPPED LOUDLY: the spec-only PVH guest (guests/independent) was NOT run"


def _require_tools() -> None:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{NOT_RUN}: {QEMU} not found on PATH")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip(f"{NOT_RUN}: /dev/kvm missing or not accessible")
    for tool in ("make", "gcc", "ld"):
        if shutil.which(tool) is None:
            pytest.skip(f"{NOT_RUN}: {tool} not found, cannot build it")


@pytest.fixture(scope="module")
def guest_elf() -> Path:
    _require_tools()
    res = subprocess.run(
        ["make", "-C", str(GUEST_DIR)], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, f"make -C guests/independent failed:\n{res.stdout}\n{res.stderr}"
    assert ELF.is_file()
    return ELF


def _boot(elf: Path, extra: list[str]) -> Boot:
    cmd = [
        QEMU,
        "-M", "microvm,x-option-roms=off,isa-serial=on",
        "-accel", "kvm",
        "-m", "64",
        "-nodefaults", "-no-user-config", "-nographic",
        "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(elf),
        *extra,
    ]  # fmt: skip
    try:
        res = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=BOOT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace")
        err = (exc.stderr or b"").decode(errors="replace")
        pytest.fail(f"guest did not reset within {BOOT_TIMEOUT_S}s\nstdout:\n{out}\nstderr:\n{err}")
    return Boot(
        res.returncode,
        res.stdout.decode(errors="replace"),
        res.stderr.decode(errors="replace"),
    )


@pytest.fixture(scope="module")
def boot(guest_elf: Path, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    initrd = tmp_path_factory.mktemp("independent") / "initrd.bin"
    initrd.write_bytes(INITRD)
    return _boot(guest_elf, ["-append", CMDLINE, "-initrd", str(initrd)])


def test_guest_resets_cleanly(boot: Boot) -> None:
    # Triple fault + -no-reboot => QEMU exits 0; a KVM emulation failure would hang.
    assert boot.returncode == 0, f"rc={boot.returncode}\n{boot.stdout}\n{boot.stderr}"
    assert "KVM internal error" not in boot.stderr
    assert boot.lines, f"no guest output:\n{boot.stdout}\n{boot.stderr}"
    assert boot.lines[-1] == PREFIX + "done"


def test_output_order(boot: Boot) -> None:
    keys = [ln[len(PREFIX) :].split("=")[0].split(" ")[0] for ln in boot.lines]
    assert keys == [
        "entry", "magic", "cmdline", "memmap", "modules", "module", "rsdp", "rsdp", "done",
    ] or keys == [
        "entry", "magic", "cmdline", "memmap", "modules", "module", "rsdp", "done",
    ], boot.stdout  # fmt: skip


def test_entry_machine_state(boot: Boot) -> None:
    m = boot.line(r"entry cr0=(0x[0-9a-f]+) cr4=(0x[0-9a-f]+) eflags=(0x[0-9a-f]+) state=(\w+)")
    cr0, cr4, eflags = (int(m.group(i), 16) for i in (1, 2, 3))
    assert cr0 & 1, "CR0.PE must be set"
    assert not cr0 & (1 << 31), "paging must be off"
    assert cr4 == 0
    assert not eflags & ((1 << 17) | (1 << 9) | (1 << 8)), "VM, IF, TF must be clear"
    assert m.group(4) == "ok"


def test_magic_and_version(boot: Boot) -> None:
    m = boot.line(r"magic ok version=(\d+)")
    assert int(m.group(1)) >= 1
    assert "bad magic" not in boot.stdout


def test_cmdline_exact(boot: Boot) -> None:
    assert boot.line(r'cmdline="(.*)"').group(1) == CMDLINE


def test_memmap(boot: Boot) -> None:
    m = boot.line(r"memmap entries=(\d+) ram_kib=(\d+)")
    assert int(m.group(1)) >= 1
    assert 60000 <= int(m.group(2)) <= 65536


def test_module(boot: Boot) -> None:
    assert int(boot.line(r"modules=(\d+)").group(1)) == 1
    m = boot.line(r"module 0 size=(\d+) first8=([0-9a-f]*)")
    assert int(m.group(1)) == len(INITRD)
    assert m.group(2) == INITRD[:8].hex()


def test_rsdp(boot: Boot) -> None:
    value = boot.line(r"rsdp=(0|0x[0-9a-f]+)").group(1)
    if value != "0":
        assert int(value, 16) < 1 << 32
        boot.line(r"rsdp signature=ok")


def test_no_initrd_reports_zero_modules(guest_elf: Path) -> None:
    b = _boot(guest_elf, ["-append", "x"])
    assert b.returncode == 0, f"rc={b.returncode}\n{b.stdout}\n{b.stderr}"
    assert b.line(r'cmdline="(.*)"').group(1) == "x"
    assert int(b.line(r"modules=(\d+)").group(1)) == 0
    assert not any(ln.startswith(PREFIX + "module ") for ln in b.lines)
    assert b.lines[-1] == PREFIX + "done"
