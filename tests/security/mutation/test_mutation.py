"""Sanity of the guards: weakening any one named bounds check (tests/security/mutation/
mutants.py) makes at least one of its named fuzzers or tests fail. Each mutant runs in a
subprocess of its own; the source files are never modified."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.security.mutation.mutants import CONTROLS, MUTANTS, Mutant
from tests.security.mutation.run import BASELINE_BROKEN, KILLED, ROOT, STALE, SURVIVED

TIMEOUT = 120
FUZZ_RUNS = int(os.environ.get("ISOVISOR_MUTATION_FUZZ_RUNS", "100"))


def _run(args: list[str]) -> tuple[int, str]:
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.security.mutation.run", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return KILLED, f"{args}: killed: timed out (a hang is a failure too)"
    out = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    code = proc.returncode
    if code < 0:  # a signal (the memory limit, a crash): the weakened check mattered
        return KILLED, f"{args}: killed by signal {-code}\n{out}"
    if code not in (KILLED, SURVIVED, BASELINE_BROKEN, STALE):
        pytest.fail(f"the mutation runner failed (exit {code}):\n{out}", pytrace=False)
    return code, out


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_weakened_check_is_caught(mutant: Mutant) -> None:
    report = []
    for harness in mutant.fuzzers:
        code, out = _run([mutant.name, "fuzz", harness, str(FUZZ_RUNS)])
        assert code not in (STALE, BASELINE_BROKEN), out
        report.append(out)
        if code == KILLED:
            break
    else:
        for node in mutant.tests:
            code, out = _run([mutant.name, "pytest", node])
            assert code != STALE, out
            report.append(out)
            if code == KILLED:
                break
        else:
            pytest.fail(f"mutant {mutant.name} survived every named fuzzer and test:\n"
                        + "\n".join(report), pytrace=False)


@pytest.mark.parametrize("control", CONTROLS, ids=[m.name for m in CONTROLS])
def test_an_equivalent_change_survives(control: Mutant) -> None:
    code, out = _run([control.name, "fuzz", control.fuzzers[0], "20"])
    assert code == SURVIVED, out
    code, out = _run([control.name, "pytest", control.tests[0]])
    assert code == SURVIVED, out
