"""The point of the inventory: a new port or MMIO handler or API route that is not in
security/surface.json and THREAT_MODEL.md makes these checks fail. Each test adds one to
the real code paths (builder, FastAPI app) for the duration of the test only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from isovisor.security.surface import Inventory
from isovisor.security.surface.api import MISSING, api_entries
from isovisor.security.surface.coverage import (
    THREAT_MODEL,
    harness_map,
    harnesses,
    parse_threat_model,
)
from isovisor.security.surface.guest import machine_entries
from isovisor.security.surface.machine import build_surface_machine
from isovisor.security.surface.model import load_ids
from tests.security.surface.conftest import ROOT


class Probe:
    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


def _uncovered(new_ids: set[str]) -> tuple[set[str], set[str]]:
    rows = parse_threat_model((ROOT / THREAT_MODEL).read_text())
    mapping = harness_map(new_ids, harnesses(ROOT))
    return new_ids - set(rows), {i for i, h in mapping.items() if not h}


@pytest.fixture
def extra_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    from isovisor.vmm import builder

    original = builder.Machine._add_legacy_devices

    def add(self: Any) -> None:
        original(self)
        self.vm.pio.register(0x80, 1, Probe(), "post-code")
        self.vm.mmio.register(0xFED0_0000, 0x400, Probe(), "hpet")

    monkeypatch.setattr(builder.Machine, "_add_legacy_devices", add)
    yield


def test_a_new_port_or_mmio_handler_fails_the_checks(extra_device: None,
                                                     inventory: Inventory,
                                                     checked_in_path: Path) -> None:
    machine = build_surface_machine()
    try:
        ids = {e.id for e in machine_entries(machine)}
    finally:
        machine.close()
    new = ids - set(inventory.ids)
    assert new == {"pio:post-code", "mmio:hpet"}
    # Not in the checked-in file, so the regenerate-and-compare test fails on them...
    assert not new & set(load_ids(checked_in_path.read_text()))
    # ...and neither the threat model nor any harness knows them.
    no_row, no_harness = _uncovered(new)
    assert no_row == new and "pio:post-code" in no_harness


def test_a_new_api_route_fails_the_checks(monkeypatch: pytest.MonkeyPatch,
                                          inventory: Inventory, checked_in_path: Path) -> None:
    from isovisor.api import app as app_module

    original = app_module.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        api = original(*args, **kwargs)

        @api.fastapi.get("/v1/debug/state")
        def debug_state() -> dict[str, str]:
            return {}

        return api

    monkeypatch.setattr(app_module, "create_app", create_app)
    found = {e.id: e for e in api_entries()}
    new = set(found) - set(inventory.ids)
    assert new == {"api:GET /v1/debug/state"}
    assert found["api:GET /v1/debug/state"].details["action"] == MISSING
    assert not new & set(load_ids(checked_in_path.read_text()))
    no_row, _ = _uncovered(new)
    assert no_row == new
