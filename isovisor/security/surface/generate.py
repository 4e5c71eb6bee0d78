"""Generating the inventory and comparing it with the checked-in copy."""

from __future__ import annotations

import logging
from pathlib import Path

from isovisor.security.surface.api import api_entries
from isovisor.security.surface.guest import machine_entries
from isovisor.security.surface.host import host_entries
from isovisor.security.surface.machine import build_surface_machine
from isovisor.security.surface.model import Inventory, diff
from isovisor.security.surface.vmm import vmm_entries

INVENTORY_PATH = Path("security") / "surface.json"


def repo_root() -> Path:
    """The checkout this isovisor package lives in."""
    return Path(__file__).resolve().parents[3]


def generate() -> Inventory:
    """Build the inventory from the code (about a second; no KVM, no root needed)."""
    # Building the machine and the daemon logs what they would log in production (security
    # events from probing, CA creation): not what a caller of the generator wants to see.
    quiet = logging.getLogger("isovisor")
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        machine = build_surface_machine()
        try:
            entries = [*machine_entries(machine), *vmm_entries(), *api_entries(),
                       *host_entries(machine)]
        finally:
            machine.close()
    finally:
        quiet.level = level
    return Inventory.of(entries)


def check(path: Path | None = None, inventory: Inventory | None = None) -> str:
    """The difference between the checked-in inventory and the code's ("" when none)."""
    path = path if path is not None else repo_root() / INVENTORY_PATH
    actual = (inventory or generate()).dumps()
    try:
        expected = path.read_text()
    except FileNotFoundError:
        expected = ""
    return diff(expected, actual, expected_name=f"{INVENTORY_PATH} (checked in)",
                actual_name=f"{INVENTORY_PATH} (generated from the code)")


def write(path: Path | None = None, inventory: Inventory | None = None) -> Path:
    path = path if path is not None else repo_root() / INVENTORY_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((inventory or generate()).dumps())
    return path
