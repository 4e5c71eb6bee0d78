"""What the daemon reads back from a VM's run directory (written by the monitor, next to
files the VMM writes): exit.json, the pid files, the handle it stored. Oracle: nothing
there can make the daemon raise; a bad file means "unknown", not a crash."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fuzz.data import Data
from isovisor.host import monitor
from isovisor.host.runner import SubprocessRunner, VmHandle, describe_exit

COVERS = ("host:state/run",)
_state: dict[str, Any] = {}
FILES = (monitor.EXIT_FILE, monitor.CHILD_PID, monitor.MONITOR_PID)


def one_input(data: bytes) -> None:
    if not _state:
        tmp = tempfile.TemporaryDirectory(prefix="isovisor-fuzz-run-")
        _state.update(tmp=tmp, runner=SubprocessRunner(Path(tmp.name) / "run"))
    d = Data(data)
    run_dir = Path(_state["tmp"].name) / "run" / "vm"
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        (run_dir / name).write_bytes(d.blob(256))
    runner: SubprocessRunner = _state["runner"]
    handle = VmHandle(pid=0x7FFF_FFF0, start_ticks=1, run_dir=str(run_dir))
    info = runner.exit_info(handle)
    assert isinstance(info.reason, str)
    assert runner._vmm_pid(handle) is None or isinstance(runner._vmm_pid(handle), int)
    assert isinstance(describe_exit(d.u32() - (1 << 31)), str)
    try:
        VmHandle.from_json(d.rest().decode("utf-8", "replace"))
    except (ValueError, TypeError, KeyError):
        pass
