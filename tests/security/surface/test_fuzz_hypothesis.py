"""The same harnesses driven by hypothesis, in-process: the equivalent of the atheris slice
where atheris cannot run (no wheel for the interpreter), and a second, differently biased
input generator where it can. Seeds from each corpus are explicit examples."""

from __future__ import annotations

import importlib
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from isovisor.security.surface.coverage import CORPUS_DIR, harnesses
from tests.security.surface.conftest import ROOT

EXAMPLES = int(os.environ.get("ISOVISOR_FUZZ_EXAMPLES", "25"))
NAMES = [h.name for h in harnesses(ROOT)]


def _harness(name: str) -> Any:
    module = importlib.import_module(f"fuzz.harnesses.{name}")
    if hasattr(module, "setup") and not getattr(module, "_hypothesis_ready", False):
        module.setup()
        module._hypothesis_ready = True
    return module


@pytest.mark.parametrize("name", NAMES)
def test_harness_under_hypothesis(name: str) -> None:
    module = _harness(name)
    seeds = sorted((ROOT / CORPUS_DIR / name).iterdir())[:3]

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=4096))
    def run(data: bytes) -> None:
        module.one_input(data)

    for seed in seeds:
        run = example(seed.read_bytes())(run)
    run()
