"""Fixtures: an audit key, a small closed log, a scratch copy to tamper with."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.security.audit import AuditSigningKey
from isovisor.security.audit.segments import segment_name
from tests.security.audit.helpers import Copy, write_log


@pytest.fixture(scope="session")
def key() -> AuditSigningKey:
    return AuditSigningKey.generate()


@pytest.fixture(scope="session")
def small_log(tmp_path_factory: pytest.TempPathFactory, key: AuditSigningKey) -> bytes:
    """The bytes of one small closed single-segment log."""
    d = write_log(tmp_path_factory.mktemp("small") / "log", key, 4)
    return (d / segment_name(0)).read_bytes()


@pytest.fixture(scope="session")
def tiny_log(tmp_path_factory: pytest.TempPathFactory, key: AuditSigningKey) -> bytes:
    """Every entry type once: genesis, checkpoint, two records, closing checkpoint."""
    d = write_log(tmp_path_factory.mktemp("tiny") / "log", key, 1)
    return (d / segment_name(0)).read_bytes()


@pytest.fixture
def copy(tmp_path: Path, key: AuditSigningKey) -> Iterator[Copy]:
    c = Copy(tmp_path, key)
    yield c
    c.close()
