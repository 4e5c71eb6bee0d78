"""The jail, checked from outside (in the spirit of Firecracker's test_jail.py): what
/proc says about a worker, what it can see, and that VMs are apart from each other."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from isovisor.vmm.stop import StopReason
from isovisor.worker.ids import ID_RANGE_SIZE, ID_RANGE_START
from isovisor.worker.namespaces import WORKER_HOSTNAME, WORKER_NAMESPACES, namespace_ids
from isovisor.worker.security_report import proc_status
from tests.worker.conftest import MEMORY, Vms

pytestmark = pytest.mark.kvm


def test_proc_status_shows_no_capabilities_no_new_privs_and_seccomp(vms: Vms) -> None:
    h = vms.launch()
    st = proc_status(h.pid)
    assert st["CapEff"] == "0" * 16
    assert st["CapPrm"] == "0" * 16
    assert st["CapInh"] == "0" * 16
    assert st["CapBnd"] == "0" * 16
    assert st["CapAmb"] == "0" * 16
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert int(st["Seccomp_filters"]) >= 2  # base + the control thread's role filter
    uid = h.uid
    assert ID_RANGE_START <= uid < ID_RANGE_START + ID_RANGE_SIZE
    assert st["Uid"].split() == [str(uid)] * 4
    assert st["Gid"].split() == [str(uid)] * 4
    assert st["Groups"] == ""
    # every thread: the vCPU thread carries the base and the vcpu role filters
    for tid in os.listdir(f"/proc/{h.pid}/task"):
        tst = proc_status(int(tid))
        assert tst["Seccomp"] == "2" and tst["CapEff"] == "0" * 16, tid


def test_worker_has_its_own_namespaces_root_and_cgroup(vms: Vms) -> None:
    h = vms.launch()
    mine, theirs = namespace_ids(), namespace_ids(h.pid)
    for name in WORKER_NAMESPACES:
        if name == "pid":  # the worker's own pid ns is its pid_for_children's parent...
            assert os.readlink(f"/proc/{h.pid}/ns/pid") != mine["pid"]
        else:
            assert theirs[name] != mine[name], name
    # only the tmpfs root in its mount table: the host's tree is gone
    mounts = Path(f"/proc/{h.pid}/mountinfo").read_text().splitlines()
    assert len(mounts) == 1, mounts
    assert " / / ro," in mounts[0] and "tmpfs" in mounts[0]
    assert sorted(os.listdir(f"/proc/{h.pid}/root")) == ["dev", "proc", "tmp"]
    # it is in its own cgroup, rooted at itself in its cgroup namespace
    groups = Path(f"/proc/{h.pid}/cgroup").read_text()
    assert f"vm-{h.uid}" in groups or groups.count(":/\n") >= 1
    for procs in h.cgroups.procs_files:
        assert str(h.pid) in Path(procs).read_text().split()


def test_cgroup_limits_are_applied(vms: Vms) -> None:
    h = vms.launch(vcpus=2, cpuset="0")
    text = {str(d): d for d in h.cgroups.dirs}
    mem = next(d for s, d in text.items() if "/memory/" in s)
    assert int((mem / "memory.limit_in_bytes").read_text()) == h.cgroups.limits.memory_bytes
    assert h.cgroups.limits.memory_bytes > MEMORY
    cpu = next(d for s, d in text.items() if "/cpu/" in s)
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "300000"  # 2 vCPUs + 1 VMM
    cpuset = next(d for s, d in text.items() if "/cpuset/" in s)
    assert (cpuset / "cpuset.cpus").read_text().strip() == "0"
    pids = next(d for s, d in text.items() if "/pids/" in s)
    assert int((pids / "pids.max").read_text()) == h.cgroups.limits.pids
    dirs = list(h.cgroups.dirs)
    h.stop("test over")
    assert h.wait(30) is not None
    assert not any(d.exists() for d in dirs), "cgroups not removed after the worker exited"
    assert not h.lease.path.exists(), "uid lease not released"


def test_probe_sees_nothing_of_the_host_or_other_vms(vms: Vms) -> None:
    first = vms.launch()
    h = vms.launcher.launch(vms.request(test_hook="probe"))
    vms.handles.append(h)
    probe = h.report["probe"]
    assert probe["pid"] == 1  # init of its own PID namespace
    assert probe["visible_pids"] == [1]  # no other process exists for it, VM or host
    assert probe["resuid"] == [h.uid] * 3 and probe["resgid"] == [h.uid] * 3
    assert probe["groups"] == []
    assert probe["hostname"] == WORKER_HOSTNAME
    assert probe["interfaces"] == ["lo"]  # an empty network namespace
    # its root (seen from the host) holds no file of the host or of another VM
    assert sorted(os.listdir(f"/proc/{h.pid}/root")) == ["dev", "proc", "tmp"]
    assert os.stat(f"/proc/{h.pid}/root").st_dev != os.stat(f"/proc/{first.pid}/root").st_dev
    attempts = probe["attempts"]
    # the layers under seccomp already deny each attempt
    assert attempts["open /etc/shadow"] in ("EACCES", "ENOENT", "EPERM")
    assert attempts["open /proc/1/mem"] in ("EACCES", "ENOENT", "EPERM")
    assert attempts["socket(AF_INET) connect"] in ("ENETUNREACH", "EACCES", "EPERM")
    assert attempts["ptrace(ATTACH, 1)"] == "EPERM"
    assert attempts["execve /bin/sh"] in ("EACCES", "ENOENT", "EPERM")
    assert attempts["mkdir /x"] in ("EACCES", "EROFS", "EPERM")
    assert attempts["list /"] == "EACCES"  # Landlock: not even its own empty root


def test_uids_differ_and_one_killed_worker_stops_only_its_vm(vms: Vms) -> None:
    hs = [vms.launch() for _ in range(3)]
    assert len({h.uid for h in hs}) == 3
    assert len({h.pid for h in hs}) == 3
    assert len({namespace_ids(h.pid)["mnt"] for h in hs}) == 3
    assert len({namespace_ids(h.pid)["net"] for h in hs}) == 3
    victim, *others = hs
    victim.kill(signal.SIGKILL)
    result = victim.wait(30)
    assert result is not None
    assert os.WIFSIGNALED(result.status) and os.WTERMSIG(result.status) == signal.SIGKILL
    assert result.exit_status == StopReason.VMM_ERROR.exit_status
    assert "SIGKILL" in result.describe()
    for h in others:
        pong = h.ping()
        assert pong is not None, "a neighbour VM died with the killed one"
        assert pong["vcpus"] == ["running"]
        assert proc_status(h.pid)["State"].split()[0] in ("S", "R")
    for h in others:
        h.stop("test over")
        res = h.wait(30)
        assert res is not None and res.exit_status == StopReason.HOST_REQUEST.exit_status
        assert res.describe() == "host request: test over"
