"""One mutant against its killers, in this (throwaway) process:

    python -m tests.security.mutation.run MUTANT fuzz HARNESS [RUNS]
    python -m tests.security.mutation.run MUTANT pytest NODEID

Exit status: 10 the killer passed unmutated and failed mutated (killed), 11 it survived,
12 the killer failed without the mutant (baseline broken), 13 the mutant no longer applies.
A pytest killer's baseline is the normal test suite; a fuzz killer's runs here first."""

from __future__ import annotations

import importlib
import logging
import os
import random
import resource
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from tests.security.mutation.apply import MutantError, apply  # noqa: E402
from tests.security.mutation.mutants import BY_NAME  # noqa: E402

KILLED, SURVIVED, BASELINE_BROKEN, STALE = 10, 11, 12, 13
MEMORY_LIMIT = 3 << 30  # a weakened loop check must not take the host down with it
INPUT_SECONDS = 5.0  # one fuzz input takes milliseconds; a runaway loop is a kill


def _replay(harness: str, runs: int) -> str | None:
    """None if every corpus input and `runs` mutations pass, else what failed."""
    from fuzz.run import corpus_files, mutate

    module = importlib.import_module(f"fuzz.harnesses.{harness}")
    if hasattr(module, "setup"):
        module.setup()
    seeds = [p.read_bytes() for p in corpus_files(harness)] or [b""]
    rng = random.Random(0)
    inputs = seeds + [mutate(rng, rng.choice(seeds), seeds) for _ in range(runs)]
    signal.signal(signal.SIGALRM, _input_timed_out)
    for i, data in enumerate(inputs):
        signal.setitimer(signal.ITIMER_REAL, INPUT_SECONDS)
        try:
            module.one_input(data)
        except Exception as exc:
            return f"input {i}: {type(exc).__name__}: {exc}"[:500]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    return None


class InputTimeoutError(Exception):
    """One input ran past INPUT_SECONDS: a weakened loop bound running away."""


def _input_timed_out(signum: int, frame: object) -> None:
    raise InputTimeoutError(f"ran longer than {INPUT_SECONDS} s (a loop bound no longer holds?)")


def main(argv: list[str]) -> int:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    logging.disable(logging.CRITICAL)
    name, kind, target, *rest = argv
    mutant = BY_NAME[name]
    if kind == "fuzz":
        runs = int(rest[0]) if rest else 100
        module = importlib.import_module(f"fuzz.harnesses.{target}")
        del module
        failure = _replay(target, runs)
        if failure is not None:
            print(f"baseline: fuzz {target} fails without the mutant: {failure}")
            return BASELINE_BROKEN
        try:
            apply(mutant)
        except MutantError as exc:
            print(exc)
            return STALE
        failure = _replay(target, runs)
        print(f"mutant {name}: fuzz {target}: "
              f"{'killed: ' + failure if failure else 'SURVIVED'}")
        return KILLED if failure else SURVIVED
    import pytest

    class Plugin:
        def pytest_configure(self, config: object) -> None:
            apply(mutant)

    try:
        apply(mutant)()  # check that it applies (and restore it) before pytest starts
    except MutantError as exc:
        print(exc)
        return STALE
    os.chdir(ROOT)
    code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "--timeout", "60", target],
                       plugins=[Plugin()])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        print(f"mutant {name}: pytest {target}: could not run it (exit {code})")
        return int(code)
    print(f"mutant {name}: pytest {target}: {'killed' if code else 'SURVIVED'}")
    return KILLED if code else SURVIVED


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except MemoryError:  # the address-space limit stopped a runaway allocation
        os._exit(KILLED)
    sys.exit(status)
