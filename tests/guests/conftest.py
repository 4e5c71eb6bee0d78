"""Fixtures for the test guests: build them once per session."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUESTS = REPO / "guests"
BUILD = GUESTS / "build"


@pytest.fixture(scope="session")
def guest_elfs() -> dict[str, Path]:
    """Build every guests/*.asm into guests/build/*.elf; map guest name -> ELF path.

    Runs make on the ELF targets themselves (the Makefile's rule, nasm + ld) rather than
    `make guests`, whose system-deps step may call apt-get. A file lock keeps concurrent
    test sessions in this checkout from building over each other.
    """
    for tool in ("make", "nasm", "ld"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: the test guests cannot be built (run `make setup`)")
    names = sorted(path.stem for path in GUESTS.glob("*.asm"))
    targets = [f"guests/build/{name}.elf" for name in names]
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run(
            ["make", "-s", *targets], cwd=REPO, capture_output=True, text=True, timeout=120
        )
    if result.returncode != 0:
        pytest.fail(f"building the test guests failed:\n{result.stdout}\n{result.stderr}")
    elfs = {name: BUILD / f"{name}.elf" for name in names}
    missing = [str(path) for path in elfs.values() if not path.is_file()]
    if missing:
        pytest.fail(f"make succeeded but these guests are missing: {missing}")
    return elfs
