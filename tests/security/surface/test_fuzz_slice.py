"""CI's slice of fuzzing: every harness under atheris for a few hundred executions,
starting from its committed corpus (so every seed and every fixed finding is replayed on
every run). `make fuzz` runs the same harnesses for FUZZ_SECONDS each."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from isovisor.security.surface.coverage import harnesses
from tests.security.surface.conftest import ROOT

# Executions per harness in CI (atheris -runs, the corpus included). A few hundred keep
# the whole slice well under a minute on two cores; ISOVISOR_FUZZ_RUNS=20000 goes deeper.
RUNS = int(os.environ.get("ISOVISOR_FUZZ_RUNS", "300"))
TIMEOUT = 180


def _runs(path: str) -> int:
    """A harness may ask for fewer CI executions (CI_RUNS = N, for slow targets)."""
    with open(path) as f:
        m = re.search(r"^CI_RUNS = (\d+)", f.read(), re.MULTILINE)
    return min(RUNS, int(m.group(1))) if m and "ISOVISOR_FUZZ_RUNS" not in os.environ else RUNS


@pytest.mark.parametrize("name", [h.name for h in harnesses(ROOT)])
def test_fuzz_slice(name: str) -> None:
    pytest.importorskip("atheris")
    runs = _runs(str(ROOT / "fuzz" / "harnesses" / f"{name}.py"))
    proc = subprocess.run(
        [sys.executable, "-m", "fuzz.run", name, "--runs", str(runs), "--mode", "ci"],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        pytest.fail(f"fuzz harness {name} failed (exit {proc.returncode}); the input is in "
                    f"fuzz/findings/ (see fuzz/README.md):\n{tail}", pytrace=False)
