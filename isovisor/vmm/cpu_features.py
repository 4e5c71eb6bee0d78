"""Names of CPUID feature bits isovisor may hide from guests, and where each bit lives."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureBit:
    leaf: int
    subleaf: int
    register: str  # "eax" | "ebx" | "ecx" | "edx"
    bit: int


# Names follow Linux's /proc/cpuinfo (and its clearcpuid= option).
FEATURES: dict[str, FeatureBit] = {
    "pclmulqdq": FeatureBit(1, 0, "ecx", 1),
    "fma": FeatureBit(1, 0, "ecx", 12),
    "cx16": FeatureBit(1, 0, "ecx", 13),
    "movbe": FeatureBit(1, 0, "ecx", 22),
    "popcnt": FeatureBit(1, 0, "ecx", 23),
    "aes": FeatureBit(1, 0, "ecx", 25),
    "xsave": FeatureBit(1, 0, "ecx", 26),
    "avx": FeatureBit(1, 0, "ecx", 28),
    "f16c": FeatureBit(1, 0, "ecx", 29),
    "rdrand": FeatureBit(1, 0, "ecx", 30),
    "fsgsbase": FeatureBit(7, 0, "ebx", 0),
    "bmi1": FeatureBit(7, 0, "ebx", 3),
    "avx2": FeatureBit(7, 0, "ebx", 5),
    "smep": FeatureBit(7, 0, "ebx", 7),
    "bmi2": FeatureBit(7, 0, "ebx", 8),
    "erms": FeatureBit(7, 0, "ebx", 9),
    "avx512f": FeatureBit(7, 0, "ebx", 16),
    "rdseed": FeatureBit(7, 0, "ebx", 18),
    "adx": FeatureBit(7, 0, "ebx", 19),
    "smap": FeatureBit(7, 0, "ebx", 20),
    "sha_ni": FeatureBit(7, 0, "ebx", 29),
    "umip": FeatureBit(7, 0, "ecx", 2),
    "pku": FeatureBit(7, 0, "ecx", 3),
    "la57": FeatureBit(7, 0, "ecx", 16),
    "rdpid": FeatureBit(7, 0, "ecx", 22),
    "fsrm": FeatureBit(7, 0, "edx", 4),
    "xsaveopt": FeatureBit(0xD, 1, "eax", 0),
    "xsavec": FeatureBit(0xD, 1, "eax", 1),
    "xsaves": FeatureBit(0xD, 1, "eax", 3),
}

# Hiding a feature hides those that architecturally depend on it.
DEPENDENTS: dict[str, tuple[str, ...]] = {
    "xsave": ("avx", "avx2", "avx512f", "fma", "f16c", "xsaveopt", "xsavec", "xsaves", "pku"),
    "avx": ("avx2", "avx512f", "fma", "f16c"),
}


def with_dependents(names: set[str]) -> set[str]:
    out = set(names)
    changed = True
    while changed:
        changed = False
        for name in list(out):
            for dep in DEPENDENTS.get(name, ()):
                if dep not in out:
                    out.add(dep)
                    changed = True
    return out
