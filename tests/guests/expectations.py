"""The output contract of the test guests (guests/*.asm), shared by every VMM's tests.

A Scenario says how to boot one guest (extra kernel command line, vCPUs, RAM), what
it must print on COM1 (regular expressions, each matching one whole line, in this
order; other lines may come in between), what to type on COM1 and when, and how the
guest must end:

- ``"reset"``: it asked for a reset through the i8042 (``out 0x64, 0xFE``);
- ``"triplefault"``: the vCPU shut down (KVM_EXIT_SHUTDOWN).

Every guest falls back to a triple fault when the i8042 write returns, so a VMM
without an i8042 sees "triplefault" for a "reset" guest: that is a failure of the VMM.

QEMU's conformance test (test_qemu_conformance.py) and isovisor's tests judge the same
guest by the same Scenario, so a difference between the two VMMs shows up as a test
that passes on one and fails on the other. guests/README.md documents each line.

Use: ``scenario.check(output)`` returns the problems found in a run's COM1 output
(empty list: the guest did what it must); ``serial_lines`` splits raw output.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

End = Literal["reset", "triplefault"]

# Lines no guest may print in a passing run: they report a broken boot contract.
FORBIDDEN: tuple[str, ...] = (
    r"guest: no PVH start_info.*",
    r"irq: unexpected exception .*",
)

_HEX32 = r"0x[0-9a-f]{8}"


@dataclass(frozen=True)
class SerialInput:
    """Bytes to write to the guest's COM1 once a line matching ``after`` was printed."""

    after: str
    data: bytes


@dataclass(frozen=True)
class Scenario:
    """One way of running one guest, and what it must do."""

    guest: str  # guests/<guest>.asm, built to guests/build/<guest>.elf
    cmdline: str = ""  # extra kernel command line (the VMM may add its own)
    vcpus: int = 1
    memory_mib: int = 64
    lines: tuple[str, ...] = ()  # regexes, each fully matching one line, in order
    end: End = "reset"
    serial_input: SerialInput | None = None
    # Named regex groups that must be integers of at least this value.
    minimums: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    timeout_s: float = 30.0  # generous: the slowest (memscan) takes ~5 s under QEMU here

    def check(self, output: str | bytes) -> list[str]:
        """Problems in a run's COM1 output; an empty list means the output conforms."""
        lines = serial_lines(output)
        problems: list[str] = []
        for line in lines:
            for bad in FORBIDDEN:
                if re.fullmatch(bad, line):
                    problems.append(f"forbidden line {line!r}")
        position = 0
        for pattern in self.lines:
            for index in range(position, len(lines)):
                found = re.fullmatch(pattern, lines[index])
                if found:
                    position = index + 1
                    problems.extend(self._check_minimums(found))
                    break
            else:
                rest = lines[position:]
                problems.append(f"no line matching {pattern!r} after line {position}: {rest!r}")
                break
        return problems

    def _check_minimums(self, found: re.Match[str]) -> list[str]:
        problems = []
        for name, value in found.groupdict().items():
            minimum = self.minimums.get(name)
            if minimum is not None and value is not None and int(value) < minimum:
                problems.append(f"{name}={value} in {found.group(0)!r} is below {minimum}")
        return problems


def serial_lines(output: str | bytes) -> list[str]:
    """Split COM1 output into lines: guests end lines with CR LF; blank lines dropped."""
    text = output.decode("utf-8", "replace") if isinstance(output, bytes) else output
    return [line.rstrip("\r") for line in text.split("\n") if line.rstrip("\r")]


# The canonical scenario of every guest, keyed by guest name.
EXPECTATIONS: Mapping[str, Scenario] = MappingProxyType(
    {
        "hello": Scenario(
            guest="hello",
            cmdline="hello=world",
            lines=(
                r"Hello from isovisor guest",
                r"cmdline: (?:.* )?hello=world(?: .*)?",
            ),
        ),
        "reset": Scenario(
            guest="reset",
            lines=(r"reset: requesting reset via i8042",),
            end="reset",
        ),
        "triplefault": Scenario(
            guest="triplefault",
            lines=(r"triplefault: loading an empty IDT",),
            end="triplefault",
        ),
        "cpuid": Scenario(
            guest="cpuid",
            lines=(
                r"cpuid: vendor=[ -~]{12}",
                rf"cpuid: max_leaf={_HEX32}",
                rf"cpuid: leaf1_eax={_HEX32}",
                rf"cpuid: leaf1_ebx={_HEX32}",
                rf"cpuid: leaf1_ecx={_HEX32}",
                rf"cpuid: leaf1_edx={_HEX32}",
                r"cpuid: hypervisor=1",  # a VMM must admit to being one
                r"cpuid: hv_max_leaf=0x4000[0-9a-f]{4}",
                r"cpuid: hv_signature=[ -~]+",
            ),
        ),
        "smp": Scenario(
            guest="smp",
            cmdline="ncpus=2",
            vcpus=2,
            lines=(
                r"smp: bsp apic=0",
                r"smp: ap apic=[1-9][0-9]*",
                r"smp: 2 cpus online",
            ),
        ),
        "memscan": Scenario(
            guest="memscan",
            memory_mib=32,
            # 32 MiB less the first MiB, the image and whatever the VMM reserves.
            lines=(r"memscan: (?P<kib>[0-9]+) KiB checked, all zero",),
            minimums=MappingProxyType({"kib": 28 * 1024}),
            timeout_s=60.0,  # ~5 s under QEMU here, twice that on a busy host
        ),
        "irq": Scenario(
            guest="irq",
            lines=(r"irq: 10 timer interrupts",),
        ),
        "echo": Scenario(
            guest="echo",
            serial_input=SerialInput(after=r"echo: ready", data=b"hello from the host\n"),
            lines=(r"echo: ready", r"echo: hello from the host"),
        ),
    }
)

# More ways of running the same guests, keyed by scenario name.
VARIANTS: Mapping[str, Scenario] = MappingProxyType(
    {
        "smp-1cpu": Scenario(
            guest="smp",
            lines=(r"smp: bsp apic=0", r"smp: 1 cpus online"),
        ),
        "smp-4cpu": Scenario(
            guest="smp",
            cmdline="ncpus=4",
            vcpus=4,
            lines=(
                r"smp: bsp apic=0",
                r"smp: ap apic=[1-9][0-9]*",
                r"smp: ap apic=[1-9][0-9]*",
                r"smp: ap apic=[1-9][0-9]*",
                r"smp: 4 cpus online",
            ),
        ),
        # The guest expects a second vCPU that is not there: its bounded wait must end.
        "smp-timeout": Scenario(
            guest="smp",
            cmdline="ncpus=2",
            lines=(r"smp: bsp apic=0", r"smp: timeout, 1 of 2 online"),
        ),
        "memscan-capped": Scenario(
            guest="memscan",
            cmdline="scanmb=4",
            memory_mib=64,
            lines=(r"memscan: 4096 KiB checked, all zero",),
        ),
    }
)

ALL_SCENARIOS: Mapping[str, Scenario] = MappingProxyType({**EXPECTATIONS, **VARIANTS})
