"""What the daemon measures about the host before it runs VMs: one (name, value) pair per
setting, read from the kernel's own files.

| name | source |
|---|---|
| kernel.release | /proc/sys/kernel/osrelease |
| kernel.cmdline | /proc/cmdline |
| kvm.<module>.<parameter> | /sys/module/kvm*/parameters/* |
| cpu.vulnerability.<name> | /sys/devices/system/cpu/vulnerabilities/* |
| cpu.smt.control, cpu.smt.active | /sys/devices/system/cpu/smt/ |
| kernel.lockdown | /sys/kernel/security/lockdown |
| kernel.randomize_va_space | /proc/sys/kernel/randomize_va_space (ASLR) |
| isovisor.manifest | SHA-256 of the verified signed manifest (added by the gate) |

Every path is read below `root` ("/" on a host; tests point it at a directory of their
own). A file that is absent or unreadable is measured as such ("<absent>",
"<unreadable: ...>"), never skipped: a missing mitigation report is a value the policy must
accept or refuse like any other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ABSENT = "<absent>"
MAX_VALUE_BYTES = 64 * 1024  # /proc/cmdline is at most a few KiB; sysfs files one page
PLATFORM = "platform"  # measurements of the host: one PCR
CODE = "code"  # measurements of isovisor's own code: another
MANIFEST_MEASUREMENT = "isovisor.manifest"


@dataclass(frozen=True)
class Measurement:
    name: str
    value: str
    kind: str = PLATFORM


def read_value(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_VALUE_BYTES)
    except FileNotFoundError:
        return ABSENT
    except OSError as exc:
        return f"<unreadable: {exc.strerror or exc}>"
    return data.decode("utf-8", errors="backslashreplace").strip()


def _dir_values(root: Path, rel: str, prefix: str) -> list[Measurement]:
    d = root / rel
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return []
    return [Measurement(f"{prefix}.{n}", read_value(d / n)) for n in names
            if not (d / n).is_dir()]


def collect(root: Path = Path("/")) -> list[Measurement]:
    """The platform measurements, in a fixed order (sorted within each group)."""
    out = [Measurement("kernel.release", read_value(root / "proc/sys/kernel/osrelease")),
           Measurement("kernel.cmdline", read_value(root / "proc/cmdline"))]
    try:
        modules = sorted(m for m in os.listdir(root / "sys/module")
                         if m == "kvm" or m.startswith("kvm_"))
    except OSError:
        modules = []
    for module in modules:
        out += _dir_values(root, f"sys/module/{module}/parameters", f"kvm.{module}")
    out += _dir_values(root, "sys/devices/system/cpu/vulnerabilities", "cpu.vulnerability")
    out += [Measurement("cpu.smt.control",
                        read_value(root / "sys/devices/system/cpu/smt/control")),
            Measurement("cpu.smt.active", read_value(root / "sys/devices/system/cpu/smt/active")),
            Measurement("kernel.lockdown", read_value(root / "sys/kernel/security/lockdown")),
            Measurement("kernel.randomize_va_space",
                        read_value(root / "proc/sys/kernel/randomize_va_space"))]
    return out


def manifest_measurement(digest: str) -> Measurement:
    return Measurement(MANIFEST_MEASUREMENT, digest, CODE)
