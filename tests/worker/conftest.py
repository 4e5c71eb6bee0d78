"""Fixtures for the worker tests: an idle guest, a launcher with test hooks enabled, and
a helper that launches idle VMs and always cleans them up."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from isovisor.kvm import Kvm
from isovisor.worker.launcher import Launcher, LaunchRequest, WorkerHandle
from isovisor.worker.test_hook import ENABLE_ENV
from tests.guests.conftest import guest_elfs  # noqa: F401  (the test guests, built once)
from tests.worker.guests import build_idle_guest

MEMORY = 32 * 1024 * 1024


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("LOUD SKIP: the worker jail needs root (cgroups, uid switch)")


@pytest.fixture(scope="session")
def idle_elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_idle_guest(tmp_path_factory.mktemp("idle-guest"))


@pytest.fixture
def launcher(kvm: Kvm, monkeypatch: pytest.MonkeyPatch) -> Iterator[Launcher]:
    require_root()
    monkeypatch.setenv(ENABLE_ENV, "1")
    with Launcher() as launcher:
        yield launcher


class Vms:
    """Launch idle VMs; every one still running at the end is killed and reaped."""

    def __init__(self, launcher: Launcher, elf: Path) -> None:
        self.launcher = launcher
        self.elf = elf
        self.handles: list[WorkerHandle] = []

    def request(self, **kw: object) -> LaunchRequest:
        return LaunchRequest(kernel=self.elf, memory=MEMORY, **kw)  # type: ignore[arg-type]

    def launch(self, **kw: object) -> WorkerHandle:
        h = self.launcher.launch(self.request(**kw))
        self.handles.append(h)
        return h

    def cleanup(self) -> None:
        for h in self.handles:
            if h.result is None:
                h.kill()
                h.wait(30)


@pytest.fixture
def vms(launcher: Launcher, idle_elf: Path) -> Iterator[Vms]:
    v = Vms(launcher, idle_elf)
    yield v
    v.cleanup()
