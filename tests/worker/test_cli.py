"""`isovisor run` goes through the jailed worker; --no-jail is a loud debugging hatch."""

from __future__ import annotations

from pathlib import Path

import pytest

from isovisor.kvm import Kvm
from tests.guests.isovisor_runner import run_isovisor

pytestmark = pytest.mark.kvm


def test_run_prints_the_guest_text_through_the_jailed_worker(
    guest_elfs: dict[str, Path], kvm: Kvm
) -> None:
    res = run_isovisor(["run", "-v", "--kernel", str(guest_elfs["hello"]), "--memory", "32M"],
                       timeout=60)
    assert res.returncode == 0, res.stderr
    assert b"Hello from isovisor guest" in res.stdout
    assert "WARNING" not in res.stderr or "core scheduling" in res.stderr
    assert "isovisor: jail: uid: 16" in res.stderr  # a uid from the reserved range
    assert "isovisor: jail: landlock:" in res.stderr
    assert "isovisor: jail: core_scheduling:" in res.stderr


def test_no_jail_runs_in_process_and_warns(guest_elfs: dict[str, Path], kvm: Kvm) -> None:
    res = run_isovisor(["run", "--no-jail", "--kernel", str(guest_elfs["hello"]),
                        "--memory", "32M"], timeout=60)
    assert res.returncode == 0, res.stderr
    assert b"Hello from isovisor guest" in res.stdout
    assert "WARNING: --no-jail" in res.stderr
    assert "never with an untrusted guest" in res.stderr
