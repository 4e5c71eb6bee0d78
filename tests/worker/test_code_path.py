"""The zygote (and every worker it forks) runs isovisor's code from a read-only view and
writes no bytecode: a write into the package or the interpreter's prefix, made from the
zygote's own mount namespace, fails with EROFS (docs/SECURITY.md, VMM integrity)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from isovisor.worker import mounts
from isovisor.worker.launcher import Launcher


def _mount_options(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        out[fields[4]] = fields[5]  # mount point -> per-mount options
    return out


def test_zygote_code_paths_are_read_only(launcher: Launcher) -> None:
    launcher.start()
    pid = launcher.zygote_pid
    assert pid is not None
    paths = mounts.code_paths()
    assert any(p.endswith("/isovisor") for p in paths)
    options = _mount_options(pid)
    for p in paths:
        assert p in options and "ro" in options[p].split(","), (p, options.get(p))
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert b"PYTHONDONTWRITEBYTECODE=1" in env
    # The attack: write new code where the next launch would import it.
    pkg = next(p for p in paths if p.endswith("/isovisor"))
    target = f"{pkg}/worker/planted_by_zygote.py"
    r = subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c", f"echo x > {target}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "Read-only file system" in r.stderr
    assert not Path(target).exists()
    # The host's own view is unchanged (the daemon and developers still write there).
    assert "ro" not in _mount_options(1).get(pkg, "rw").split(",")


def test_daemon_runs_vmms_without_writing_bytecode(tmp_path: Path) -> None:
    from isovisor.host.runner import Launch, default_command

    cmd = default_command(Launch("vm", tmp_path / "k", 1, 64), tmp_path / "console.log")
    assert cmd[1:4] == ["-B", "-m", "isovisor.cli.main"]
