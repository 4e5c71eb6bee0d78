"""A shared API stack per test module: real CA, real certificates, real uvicorn over TLS."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.stack import Stack, build_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = build_stack(tmp_path_factory.mktemp("api"))
    s.identity("admin")
    s.service.bootstrap_admin("admin")
    yield s
    s.close()
