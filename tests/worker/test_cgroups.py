"""cgroup layouts: what is written where on v1, v2 and hybrid (fake trees), and this
host's real layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from isovisor.worker import cgroups
from isovisor.worker.errors import JailError

LIMITS = cgroups.CgroupLimits.for_vm(vcpus=2, guest_memory=256 << 20, cpuset="0-1")


def _v1_tree(root: Path) -> dict[str, Path]:
    dirs = {}
    for c in cgroups.V1_CONTROLLERS:
        d = root / c
        d.mkdir(parents=True)
        if c == "cpuset":
            (d / "cpuset.cpus").write_text("0-3\n")
            (d / "cpuset.mems").write_text("0\n")
        dirs[c] = d
    return dirs


def test_v1_layout_writes_the_v1_files(tmp_path: Path) -> None:
    layout = cgroups.Layout(v1=_v1_tree(tmp_path))
    g = cgroups.create("vm-7", LIMITS, layout)
    d = {p.parent.parent.name: p for p in g.dirs}
    assert (d["cpu"] / "cpu.cfs_quota_us").read_text() == "300000"  # 2 vCPUs + 1 VMM core
    assert (d["cpu"] / "cpu.cfs_period_us").read_text() == "100000"
    assert (d["cpuset"] / "cpuset.cpus").read_text() == "0-1"
    assert (d["cpuset"] / "cpuset.mems").read_text() == "0"
    assert (tmp_path / "cpuset/isovisor/cpuset.cpus").read_text() == "0-3"
    assert int((d["memory"] / "memory.limit_in_bytes").read_text()) == \
        (256 << 20) + cgroups.MEMORY_OVERHEAD
    assert int((d["pids"] / "pids.max").read_text()) == 2 + cgroups.EXTRA_TASKS
    assert g.procs_files == [str(p / "cgroup.procs") for p in g.dirs]


def test_v2_layout_enables_controllers_and_writes_the_v2_files(tmp_path: Path) -> None:
    root = tmp_path / "unified"
    root.mkdir()
    layout = cgroups.Layout(v2=root, v2_controllers=frozenset(cgroups.V1_CONTROLLERS))
    (root / "isovisor").mkdir()
    (root / "isovisor" / "cpuset.cpus.effective").write_text("0-3\n")
    g = cgroups.create("vm-9", cgroups.CgroupLimits(1.5, 1 << 30, 40), layout)
    [d] = g.dirs
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +cpuset +memory +pids"
    assert (root / "isovisor" / "cgroup.subtree_control").read_text() == \
        "+cpu +cpuset +memory +pids"
    assert (d / "cpu.max").read_text() == "150000 100000"
    assert (d / "cpuset.cpus").read_text() == "0-3"
    assert (d / "memory.max").read_text() == str(1 << 30)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "pids.max").read_text() == "40"


def test_v2_without_controllers_refuses(tmp_path: Path) -> None:
    layout = cgroups.Layout(v2=tmp_path, v2_controllers=frozenset({"cpu"}))
    with pytest.raises(JailError, match="lacks cpuset, memory, pids"):
        cgroups.create("vm-1", LIMITS, layout)


def test_hybrid_puts_limits_in_v1_and_joins_unified(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    layout = cgroups.Layout(v1=_v1_tree(tmp_path / "v1"), v2=unified)
    g = cgroups.create("vm-3", LIMITS, layout)
    assert layout.kind == "hybrid"
    assert unified / "isovisor" / "vm-3" in g.dirs
    assert not (unified / "isovisor" / "vm-3" / "memory.max").exists()
    assert len(g.dirs) == 5


def test_missing_v1_controller_is_named(tmp_path: Path) -> None:
    tree = _v1_tree(tmp_path)
    del tree["pids"]
    with pytest.raises(JailError, match="pids is not mounted"):
        cgroups.create("vm-1", LIMITS, cgroups.Layout(v1=tree))


def test_this_hosts_layout_is_detected() -> None:
    layout = cgroups.detect()
    assert layout.kind in ("v1", "v2", "hybrid")
    for path in [*layout.v1.values(), *([layout.v2] if layout.v2 else [])]:
        assert (path / "cgroup.procs").exists(), path
