"""`isovisor surface`: prints, checks (failing with the difference and one sentence) and
writes the inventory."""

from __future__ import annotations

from pathlib import Path

import pytest

from isovisor.cli.main import main
from isovisor.security.surface import Inventory


@pytest.fixture
def generated(monkeypatch: pytest.MonkeyPatch, inventory: Inventory) -> Inventory:
    import isovisor.security.surface as surface

    monkeypatch.setattr(surface, "generate", lambda: inventory)
    return inventory


def test_write_then_check_passes(generated: Inventory, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "surface.json"
    assert main(["surface", "--write", "--path", str(path)]) == 0
    assert path.read_text() == generated.dumps()
    assert main(["surface", "--check", "--path", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_check_fails_with_the_difference(generated: Inventory, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "surface.json"
    path.write_text(generated.dumps().replace('"pio:com1"', '"pio:com9"'))
    assert main(["surface", "--check", "--path", str(path)]) == 1
    err = capsys.readouterr().err
    assert '-      "id": "pio:com9",' in err and '+      "id": "pio:com1",' in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("isovisor: ") and "isovisor surface --write" in last


def test_no_option_prints_the_inventory(generated: Inventory,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["surface"]) == 0
    assert capsys.readouterr().out == generated.dumps()
