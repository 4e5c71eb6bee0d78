"""What the benchmarks that run a PVH guest under isovisor and under QEMU share
(bench/exits.py, bench/blk.py): the tool checks, building the guest ELF, running a VMM while
timing its output, the host facts printed beside the numbers, and a count option."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import selectors
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
GUEST_INCLUDE = REPO / "guests" / "include"  # cmdline_tokens.inc, serial_out.inc
BUILD_DIR = REPO / "cache" / "bench"  # /cache/ is git-ignored


class BenchError(Exception):
    """Something the user must fix (missing tool, failing VMM); printed without a trace."""


def isovisor_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def check_tools(qemu: str) -> None:
    """nasm, ld, the QEMU peer, /dev/kvm and an importable isovisor, or a BenchError."""
    missing = [t for t in ("nasm", "ld") if shutil.which(t) is None]
    if missing:
        raise BenchError(
            f"{' and '.join(missing)} not found: install nasm and binutils "
            "(`make system-deps` does)"
        )
    if shutil.which(qemu) is None:
        raise BenchError(
            f"{qemu} not found: QEMU is the peer this benchmark measures against; install "
            "Debian's qemu-system-x86 (`make system-deps`) or pass --qemu PATH"
        )
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise BenchError("/dev/kvm is missing or not readable and writable by this user")
    probe = subprocess.run(
        [isovisor_python(), "-c", "import isovisor.cli.main"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    if probe.returncode != 0:
        raise BenchError(
            f"cannot import isovisor with {isovisor_python()} (run `make setup`):\n"
            + probe.stderr.strip()
        )


def build_guest(asm: Path, ld: Path) -> Path:
    """Assemble (with guests/include/ on nasm's path) and link BUILD_DIR/<asm stem>.elf,
    unless it is newer than the source, the linker script and every include file."""
    elf = BUILD_DIR / f"{asm.stem}.elf"
    sources = (asm, ld, *GUEST_INCLUDE.glob("*.inc"))
    if elf.exists() and all(elf.stat().st_mtime >= s.stat().st_mtime for s in sources):
        return elf
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    obj = BUILD_DIR / f"{asm.stem}.o"
    for cmd in (
        ["nasm", "-f", "elf32", "-I", f"{GUEST_INCLUDE}/", "-o", str(obj), str(asm)],
        ["ld", "-m", "elf_i386", "-T", str(ld), "-o", str(elf), str(obj)],
    ):
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            elf.unlink(missing_ok=True)
            raise BenchError(f"building the guest failed: {' '.join(cmd)}\n{res.stderr}")
    obj.unlink(missing_ok=True)
    print(f"built {elf.relative_to(REPO)}", flush=True)
    return elf


class Output(NamedTuple):
    """What a VMM process wrote and when (timed_output)."""

    out: bytes
    chunks: list[tuple[int, float]]  # (end offset in out, arrival time) per read
    rc: int
    stderr: str
    wall: float  # seconds from the process's start to its exit


def timed_output(cmd: list[str], timeout: float) -> Output:
    """Run `cmd` (in the repository), timing each chunk of its stdout as it arrives; a
    BenchError if it has not exited after `timeout` seconds."""
    with tempfile.TemporaryFile() as err:
        began = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, cwd=REPO)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        out = bytearray()
        chunks: list[tuple[int, float]] = []
        deadline = began + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    proc.kill()
                    proc.wait()
                    raise BenchError(f"{shlex.join(cmd)} did not finish within {timeout:.0f} s;"
                                     f" output so far:\n{out.decode(errors='replace')}")
                if not sel.select(left):
                    continue
                data = os.read(fd, 65536)
                now = time.perf_counter()
                if not data:
                    break
                out += data
                chunks.append((len(out), now))
        rc = proc.wait()
        wall = time.perf_counter() - began
        err.seek(0)
        return Output(bytes(out), chunks, rc, err.read().decode(errors="replace").strip(), wall)


def time_at(chunks: list[tuple[int, float]], offset: int) -> float:
    """When the byte at `offset` of the stream arrived (chunks: (end offset, time))."""
    for end, t in chunks:
        if offset < end:
            return t
    raise ValueError(offset)


def host_facts(qemu: str) -> dict[str, str]:
    """Date, kernel, CPU, kind of KVM, QEMU and Python versions, commit, load average."""
    cpu = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == "unknown":
                cpu = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    if "vmx" in flags or "svm" in flags:
        kind = "hardware virtualization (" + ("VMX" if "vmx" in flags else "SVM") + ")"
    elif Path("/sys/module/kvm_pvm").exists():
        kind = "PVM (kvm_pvm; no VMX/SVM: guest kernel mode is emulated by KVM)"
    else:
        kind = "unknown (no VMX/SVM flag, no kvm_pvm module)"
    try:
        version = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0].strip()
    except (OSError, IndexError):
        version = "unknown"
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=False,
        ).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "Date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "Kernel": platform.release(),
        "CPU": f"{cpu}, {os.cpu_count()} logical CPUs",
        "KVM": kind,
        "QEMU": version,
        "Python": platform.python_version(),
        "isovisor commit": commit,
        "Load average at start": load,
    }


def positive(text: str) -> int:
    """argparse type: a whole number, at least 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return v
