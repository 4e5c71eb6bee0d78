"""Where a host keeps its audit log and key unless told otherwise (environment first)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DIR = Path("/var/lib/isovisor/audit")
DEFAULT_KEY = Path("/var/lib/isovisor/keys/audit.key")
DIR_ENV = "ISOVISOR_AUDIT_DIR"
KEY_ENV = "ISOVISOR_AUDIT_KEY"


def default_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR)


def default_key() -> Path:
    return Path(os.environ.get(KEY_ENV) or DEFAULT_KEY)
