"""The checked-in inventory is the code's: CI regenerates it and prints any difference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from isovisor.security.rbac.actions import ALL_ACTIONS
from isovisor.security.surface import SCHEMA_VERSION, Inventory
from isovisor.security.surface.api import AUTHENTICATED, MISSING
from isovisor.security.surface.model import BOUNDARIES, diff


def test_checked_in_inventory_matches_the_code(inventory: Inventory,
                                               checked_in_path: Path) -> None:
    expected = checked_in_path.read_text() if checked_in_path.exists() else ""
    difference = diff(expected, inventory.dumps(), expected_name="security/surface.json",
                      actual_name="generated from the code")
    if difference:
        pytest.fail("the attack surface changed: review the difference below, then run "
                    "`isovisor surface --write` and add a THREAT_MODEL.md row and a fuzz "
                    "harness for every new entry\n" + difference, pytrace=False)


def test_inventory_is_sorted_versioned_and_well_formed(inventory_json: dict[str, Any]) -> None:
    assert inventory_json["schema"] == SCHEMA_VERSION
    ids = [e["id"] for e in inventory_json["entries"]]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    for e in inventory_json["entries"]:
        assert e["boundary"] in BOUNDARIES, e
        assert e["id"].startswith(e["kind"] + ":"), e
        assert e["source"], e


def test_serialisation_is_stable(inventory: Inventory) -> None:
    again = Inventory.of(reversed(inventory.entries))
    assert again.dumps() == inventory.dumps()
    assert json.loads(inventory.dumps())["entries"][0]["id"] == inventory.ids[0]


def test_every_route_declares_an_rbac_action(entries: dict[str, dict[str, Any]]) -> None:
    routes = {i: e for i, e in entries.items() if e["kind"] == "api"}
    assert routes
    missing = [i for i, e in routes.items() if e["action"] == MISSING]
    assert not missing, f"routes without x-isovisor-action: {missing}"
    unknown = [i for i, e in routes.items()
               if e["action"] not in ALL_ACTIONS and e["action"] != AUTHENTICATED]
    assert not unknown, f"routes naming an action RBAC does not know: {unknown}"


def test_every_device_kind_of_the_builder_is_inventoried(
        entries: dict[str, dict[str, Any]]) -> None:
    import importlib
    import pkgutil

    import isovisor.devices.virtio as virtio_pkg
    from isovisor.devices.virtio.device import VirtioDevice

    # Import every device module: every concrete VirtioDevice must be in the inventory (a
    # device type that exists but that the builder does not wire fails here).
    for info in pkgutil.walk_packages(virtio_pkg.__path__, virtio_pkg.__name__ + "."):
        importlib.import_module(info.name)

    def concrete(cls: type[VirtioDevice]) -> list[type[VirtioDevice]]:
        out = []
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("isovisor."):
                out.append(sub)
            out.extend(concrete(sub))
        return out

    names = {c.name for c in concrete(VirtioDevice)}
    inventoried = {i.split(":", 1)[1] for i in entries if i.startswith("virtio:")}
    assert names <= inventoried, f"device types not wired by the builder: {names - inventoried}"
