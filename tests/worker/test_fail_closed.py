"""Fail closed: a jail step that fails stops the launch, and the error names the step;
nothing is left behind (no process, no cgroup, no uid lease)."""

from __future__ import annotations

from pathlib import Path

import pytest

from isovisor.worker import cgroups
from isovisor.worker.errors import BuildError, JailError
from tests.worker.conftest import Vms

pytestmark = pytest.mark.kvm


def _leftovers(launcher_leases: Path) -> list[str]:
    return sorted(p.name for p in launcher_leases.iterdir() if not p.name.startswith("."))


def _vm_groups() -> set[Path]:
    layout = cgroups.detect()
    bases = [*layout.v1.values(), *([layout.v2] if layout.v2 else [])]
    return {d for b in bases if (b / cgroups.GROUP_PARENT).is_dir()
            for d in (b / cgroups.GROUP_PARENT).iterdir() if d.name.startswith("vm-")}


def test_impossible_cgroup_limit_refuses_to_start_naming_the_step(vms: Vms) -> None:
    before = _leftovers(vms.launcher.ids.dir)
    groups_before = _vm_groups()
    with pytest.raises(JailError) as info:
        vms.launch(cpuset="4095")  # no such CPU
    assert info.value.step == "cgroups"
    assert "jail step 'cgroups' failed" in str(info.value)
    assert "cpuset.cpus=4095" in str(info.value)
    assert _leftovers(vms.launcher.ids.dir) == before
    assert _vm_groups() <= groups_before  # what it had made is removed


def test_missing_bind_source_refuses_to_start_naming_the_step(vms: Vms,
                                                              tmp_path: Path) -> None:
    before = _leftovers(vms.launcher.ids.dir)
    with pytest.raises(JailError) as info:
        vms.launch(binds={str(tmp_path / "does-not-exist"): "/data"})
    assert info.value.step == "mounts"
    assert "bind source" in str(info.value) and "does not exist" in str(info.value)
    assert _leftovers(vms.launcher.ids.dir) == before
    # the zygote reaped the worker: the launcher saw it exit
    assert vms.launcher.zygote_pid is not None


def test_a_good_bind_is_read_only_in_the_worker(vms: Vms, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    h = vms.launch(binds={str(tmp_path): "/data"})
    mounts = Path(f"/proc/{h.pid}/mountinfo").read_text().splitlines()
    data = [m for m in mounts if " /data " in m]
    assert data and " ro," in data[0] and "nosuid" in data[0] and "noexec" in data[0]


def test_a_bad_kernel_is_a_build_error_not_a_jail_error(vms: Vms, tmp_path: Path) -> None:
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"\x7fELF" + b"\x00" * 60)
    with pytest.raises(BuildError):
        vms.launcher.launch(vms.request().__class__(kernel=bad))
    with pytest.raises(BuildError, match="does not exist"):
        vms.launcher.launch(vms.request().__class__(kernel=tmp_path / "nope"))
