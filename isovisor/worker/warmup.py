"""The zygote builds (and tears down) one throwaway VM before it freezes its heap.

A forked worker shares the zygote's pages until it writes them, and CPython writes a page
whenever it touches an object on it. Much of what the build path touches the first time
is made on first use: caches and free lists (ctypes, struct, enum, functools, the type
attribute cache), lazily created objects, code being readied to run. Built once in the
zygote, those are shared by every worker instead of being made, privately, by each of
them (bench/worker_memory.py: about 0.2 MiB less per worker). The VM is the PVH builder's
smallest: a hlt loop, 16 MiB, no devices; it never runs.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from isovisor.kvm import Kvm
from isovisor.vmm.builder import Machine, SerialSpec, VmSpec
from isovisor.vmm.emulator_probe import EmulatorProbe
from isovisor.worker.pvh_image import HLT_LOOP, pvh_elf

log = logging.getLogger(__name__)

WARMUP_MEMORY = 16 << 20  # the builder's minimum


def warm_up(probe: EmulatorProbe) -> float:
    """Build and close one VM; milliseconds taken. Never fails the zygote: a warm-up that
    cannot run (say, /dev/kvm busy) only costs the workers that memory."""
    t0 = time.perf_counter()
    fd = os.memfd_create("isovisor-warmup-kernel", os.MFD_CLOEXEC)
    try:
        os.write(fd, pvh_elf(HLT_LOOP))
        with Kvm() as kvm:
            spec = VmSpec(kernel=Path(f"/proc/self/fd/{fd}"), memory=WARMUP_MEMORY,
                          serial=SerialSpec(target="none"))
            Machine(spec, kvm, probe=probe).close()
    except Exception as exc:  # an optimisation only: it never fails the zygote
        log.warning("zygote warm-up skipped: %s", exc)
    finally:
        os.close(fd)
    return (time.perf_counter() - t0) * 1000
