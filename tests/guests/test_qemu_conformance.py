"""Boot every test guest in QEMU (microvm, KVM) and judge it by tests/guests/expectations.

QEMU is the reference VMM: a scenario that passes here and fails under isovisor points at
isovisor. The command line (see qemu_command) and why each flag is there are documented
in guests/README.md. How a run ended is read from QEMU's `kvm_run_exit` trace: a
KVM_EXIT_SHUTDOWN (reason 8) means a triple fault; a clean exit without one means the
i8042 reset (`-device i8042`: microvm has none by default) stopped the VM (-no-reboot).
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

try:  # the repository root on sys.path (python -m pytest), or rootdir-less prepend mode
    from tests.guests.expectations import ALL_SCENARIOS, EXPECTATIONS, Scenario, serial_lines
except ImportError:
    from expectations import (  # type: ignore[import-not-found, no-redef]
        ALL_SCENARIOS,
        EXPECTATIONS,
        Scenario,
        serial_lines,
    )

QEMU = shutil.which("qemu-system-x86_64")
KVM = Path("/dev/kvm")


def _missing() -> str | None:
    if QEMU is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    if not KVM.exists():
        return "/dev/kvm does not exist"
    if not os.access(KVM, os.R_OK | os.W_OK):
        return "/dev/kvm is not readable and writable by this user"
    return None


_MISSING = _missing()
requires_qemu = pytest.mark.skipif(
    _MISSING is not None,
    reason=f"QEMU CONFORMANCE TESTS NOT RUN: {_MISSING}",
)

# QEMU's KVM_EXIT_SHUTDOWN (triple fault) as its kvm_run_exit trace event shows it.
_SHUTDOWN_EXIT = re.compile(r"kvm_run_exit cpu_index \d+, reason 8\b")
# What QEMU prints when KVM cannot emulate an instruction; the VM then sits paused.
_INTERNAL_ERROR = "KVM internal error"


def qemu_command(
    scenario: Scenario,
    elf: Path,
    *,
    machine_options: Sequence[str] = (),
    i8042: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line for one scenario."""
    assert QEMU is not None
    options = ["x-option-roms=off", "rtc=on", "isa-serial=on", *machine_options]
    machine = ",".join(["microvm", *options])
    vcpus = scenario.vcpus
    command = [
        QEMU,
        "-M", machine,
        "-accel", "kvm",
        # Plain `-cpu host` aborts on this PVM host (KVM refuses QEMU's value for
        # MSR 0x10a, IA32_ARCH_CAPABILITIES); without that one feature it runs.
        "-cpu", "host,-arch-capabilities",
        "-m", str(scenario.memory_mib),
        "-smp", f"{vcpus},sockets=1,cores={vcpus}",
        "-nodefaults", "-no-user-config", "-nographic",
        "-serial", "stdio",
        "-no-reboot",
        "-trace", "enable=kvm_run_exit",
        "-kernel", str(elf),
    ]  # fmt: skip
    if i8042:
        command += ["-device", "i8042"]
    if scenario.cmdline:
        command += ["-append", scenario.cmdline]
    return [*command, *extra]


@dataclass(frozen=True)
class QemuRun:
    command: list[str]
    stdout: bytes  # the guest's COM1 output
    stderr: str  # QEMU's messages and the kvm_run_exit trace
    returncode: int | None  # None: killed (timeout or KVM internal error)
    seconds: float

    @property
    def internal_error(self) -> bool:
        return _INTERNAL_ERROR in self.stderr

    @property
    def end(self) -> str | None:
        """ "triplefault", "reset" (exited cleanly without a shutdown exit), or None."""
        if _SHUTDOWN_EXIT.search(self.stderr):
            return "triplefault"
        return "reset" if self.returncode == 0 else None

    def describe(self) -> str:
        stderr = [line for line in self.stderr.splitlines() if "kvm_run_exit" not in line]
        return (
            f"\ncommand: {' '.join(self.command)}\nreturncode: {self.returncode} "
            f"after {self.seconds:.2f} s\nCOM1:\n{self.stdout.decode('utf-8', 'replace')}"
            f"\nQEMU stderr (trace lines left out):\n" + "\n".join(stderr[-40:])
        )


def run_qemu(command: list[str], scenario: Scenario) -> QemuRun:
    """Run QEMU until it exits or the scenario's timeout; type the scenario's input."""
    start = time.monotonic()
    deadline = start + scenario.timeout_s
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    err = bytearray()
    pending_input = scenario.serial_input
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ, out)
    selector.register(proc.stderr, selectors.EVENT_READ, err)
    try:
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
            if pending_input is not None and any(
                re.fullmatch(pending_input.after, line) for line in serial_lines(bytes(out))
            ):
                proc.stdin.write(pending_input.data)
                proc.stdin.flush()
                pending_input = None
            if _INTERNAL_ERROR.encode() in err:
                # QEMU pauses the VM and waits forever: collect its register dump, stop.
                deadline = min(deadline, time.monotonic() + 0.5)
        try:
            returncode: int | None = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            returncode = None
    finally:
        selector.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    return QemuRun(
        command=command,
        stdout=bytes(out),
        stderr=err.decode("utf-8", "replace"),
        returncode=returncode,
        seconds=time.monotonic() - start,
    )


def assert_ran_to_end(run: QemuRun) -> None:
    assert not run.internal_error, f"KVM could not emulate the guest{run.describe()}"
    assert run.returncode is not None, f"QEMU did not exit in time{run.describe()}"
    assert run.returncode == 0, f"QEMU failed{run.describe()}"


@pytest.mark.qemu
@pytest.mark.kvm
@requires_qemu
@pytest.mark.parametrize("name", sorted(ALL_SCENARIOS))
def test_guest_conforms(name: str, guest_elfs: dict[str, Path]) -> None:
    """Every scenario in expectations.py, exactly as isovisor's tests run it."""
    scenario = ALL_SCENARIOS[name]
    run = run_qemu(qemu_command(scenario, guest_elfs[scenario.guest]), scenario)
    assert_ran_to_end(run)
    problems = scenario.check(run.stdout)
    assert not problems, "\n".join(problems) + run.describe()
    assert run.end == scenario.end, f"expected the guest to end by {scenario.end}{run.describe()}"


@pytest.mark.qemu
@pytest.mark.kvm
@requires_qemu
def test_reset_falls_back_to_triple_fault_without_i8042(guest_elfs: dict[str, Path]) -> None:
    """QEMU microvm's default has no i8042: the write returns, the fallback must end it."""
    scenario = EXPECTATIONS["reset"]
    run = run_qemu(qemu_command(scenario, guest_elfs["reset"], i8042=False), scenario)
    assert_ran_to_end(run)
    assert not scenario.check(run.stdout), run.describe()
    assert run.end == "triplefault", run.describe()


@pytest.mark.qemu
@pytest.mark.kvm
@requires_qemu
def test_memscan_reports_planted_bytes(guest_elfs: dict[str, Path], tmp_path: Path) -> None:
    """memscan must notice nonzero RAM: QEMU's loader device plants 4 bytes at 16 MiB."""
    planted = tmp_path / "planted.bin"
    planted.write_bytes(b"\xde\xad\xbe\xef")
    scenario = Scenario(
        guest="memscan",
        memory_mib=32,
        lines=(r"memscan: (?P<kib>[0-9]+) KiB checked, nonzero at 0x01000000",),
        timeout_s=60.0,
        # Everything from the end of the image (1 MiB + a few KiB) up to 16 MiB.
        minimums={"kib": 15 * 1024 - 64},
    )
    extra = ["-device", f"loader,file={planted},addr=0x1000000,force-raw=on"]
    run = run_qemu(qemu_command(scenario, guest_elfs["memscan"], extra=extra), scenario)
    assert_ran_to_end(run)
    problems = scenario.check(run.stdout)
    assert not problems, "\n".join(problems) + run.describe()


@pytest.mark.qemu
@pytest.mark.kvm
@requires_qemu
def test_irq_times_out_without_a_pit(guest_elfs: dict[str, Path]) -> None:
    """With no PIT (microvm pit=off) the irq guest's wait must end, and say so."""
    scenario = Scenario(guest="irq", lines=(r"irq: timeout \(0 timer interrupts\)",))
    command = qemu_command(scenario, guest_elfs["irq"], machine_options=["pit=off"])
    run = run_qemu(command, scenario)
    assert_ran_to_end(run)
    problems = scenario.check(run.stdout)
    assert not problems, "\n".join(problems) + run.describe()


# --- The ELF format itself (no QEMU needed) -----------------------------------------

PT_LOAD = 1
PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18


@pytest.mark.parametrize("name", sorted(EXPECTATIONS))
def test_guest_is_a_pvh_elf(name: str, guest_elfs: dict[str, Path]) -> None:
    """32-bit ELF loaded at 1 MiB, with the Xen PHYS32_ENTRY note pointing into it."""
    data = guest_elfs[name].read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 1, "not a 32-bit ELF"
    e_entry, e_phoff = struct.unpack_from("<II", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 42)
    loads: list[tuple[int, int]] = []
    entries: list[int] = []
    for index in range(e_phnum):
        p_type, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIIIII", data, e_phoff + index * e_phentsize
        )
        if p_type == PT_LOAD:
            loads.append((p_paddr, p_paddr + p_memsz))
        elif p_type == PT_NOTE:
            offset, end = p_offset, p_offset + p_filesz
            while offset + 12 <= end:
                namesz, descsz, note_type = struct.unpack_from("<III", data, offset)
                name_bytes = data[offset + 12 : offset + 12 + namesz]
                desc_at = offset + 12 + (namesz + 3) // 4 * 4
                if name_bytes == b"Xen\0" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                    assert descsz == 4
                    entries.append(struct.unpack_from("<I", data, desc_at)[0])
                offset = desc_at + (descsz + 3) // 4 * 4
    assert min(start for start, _ in loads) == 0x100000, f"not linked at 1 MiB: {loads}"
    assert len(entries) == 1, "no (or more than one) XEN_ELFNOTE_PHYS32_ENTRY note"
    assert entries[0] == e_entry
    assert any(start <= entries[0] < end for start, end in loads)
