"""A real swtpm per test (fresh PCRs, like a host after a reboot)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.security.tpm import Swtpm, Tpm, TpmAddress


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    with Swtpm(tmp_path / "tpm") as sw:
        yield sw


@pytest.fixture
def tpm(swtpm: Swtpm) -> Tpm:
    return Tpm(TpmAddress.swtpm(swtpm.socket_path))
