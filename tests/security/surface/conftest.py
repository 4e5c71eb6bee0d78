"""The inventory, generated once per test session from the code (a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from isovisor.security.surface import INVENTORY_PATH, Inventory, generate, repo_root

ROOT = repo_root()


@pytest.fixture(scope="session")
def inventory() -> Inventory:
    return generate()


@pytest.fixture(scope="session")
def inventory_json(inventory: Inventory) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(inventory.dumps())
    return doc


@pytest.fixture(scope="session")
def entries(inventory_json: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["id"]: e for e in inventory_json["entries"]}


@pytest.fixture(scope="session")
def checked_in_path() -> Path:
    return ROOT / INVENTORY_PATH
