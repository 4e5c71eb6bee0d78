"""The zygote: a template process that imports the worker and VMM code once, compiles the
seccomp filters once, and forks one worker per VM, so a worker starts in milliseconds and
shares the interpreter's pages with every other worker (copy-on-write).

It serves one host-side launcher over a SOCK_SEQPACKET socket (fd passed at exec):
  launcher -> zygote  launch {config} + fds      zygote -> launcher  launched {pid}
                                                                      launch-failed {...}
                                                                      exited {pid, status}
It is a child subreaper: each VM process is the grandchild it forked through the PID
namespace step, and comes back to it to be reaped. When the launcher's socket closes, the
zygote kills its workers and exits. It must stay single-threaded (it forks).

Run as `python -m isovisor.worker.zygote --fd N` (the launcher does this).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import select
import signal
import socket
import sys
import time
from typing import Any

from isovisor.worker import libc, mounts, preload, protocol
from isovisor.worker.child import HostFacts, worker_entry
from isovisor.worker.config import WorkerConfig
from isovisor.worker.errors import ProtocolError
from isovisor.worker.warmup import warm_up

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
OP_HELLO = "hello"
OP_ZYGOTE_FAILED = "zygote-failed"
# W0 joins cgroups, unshares and forks: milliseconds. Anything this slow is stuck.
W0_REPORT_TIMEOUT_S = 10.0


def prepare() -> tuple[HostFacts, dict[str, Any]]:
    """Import everything, compile the filters, read the host facts the worker cannot."""
    t0 = time.perf_counter()
    failed = preload.preload()
    from isovisor.kvm import Kvm, KvmUnavailableError
    from isovisor.vmm.emulator_probe import cached_probe
    from isovisor.worker import capabilities, core_sched
    from isovisor.worker.seccomp.compile import compile_bpf
    from isovisor.worker.seccomp.policy import POLICIES

    programs = {name: compile_bpf(make()) for name, make in POLICIES.items()}
    probe = None
    try:  # the emulator probe runs once per host boot; workers get its result from here
        with Kvm() as kvm:
            probe = cached_probe(kvm)
    except KvmUnavailableError:
        pass
    mounts.prepare_mount_point()
    facts = HostFacts(programs, capabilities.last_cap(), core_sched.smt_state(), probe)
    warmup_ms = warm_up(probe) if probe is not None else 0.0
    gc.collect()
    gc.freeze()  # the collector never touches preloaded objects: fewer copied pages
    info = {"pid": os.getpid(), "preload_failed": failed,
            "prepare_ms": round((time.perf_counter() - t0) * 1000, 1),
            "warmup_ms": round(warmup_ms, 1)}
    return facts, info


class Zygote:
    def __init__(self, sock: socket.socket, facts: HostFacts) -> None:
        self.sock = sock
        self.facts = facts
        self.workers: set[int] = set()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def spawn(self, cfg: WorkerConfig, fds: list[int]) -> int:
        """Fork W0; return the VM process's pid (its report), or raise OSError."""
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        pid0 = os.fork()
        if pid0 == 0:
            os.close(report_r)
            worker_entry(cfg, fds, report_w, self.facts, [self.sock])
        os.close(report_w)
        try:
            data = b""
            deadline = time.monotonic() + W0_REPORT_TIMEOUT_S
            while time.monotonic() < deadline:
                ready, _, _ = select.select([report_r], [], [], 0.5)
                if ready:
                    chunk = os.read(report_r, 64)
                    if not chunk:
                        break
                    data += chunk
            else:
                os.kill(pid0, signal.SIGKILL)
        finally:
            os.close(report_r)
            _, status = os.waitpid(pid0, 0)
        text = data.decode().strip()
        if not text.isdigit():
            raise OSError(f"the worker's first process ended with status {status} "
                          "before starting the VM process")
        pid = int(text)
        self.workers.add(pid)
        return pid

    def _on_launch(self, msg: protocol.Message) -> None:
        try:
            cfg = WorkerConfig.from_json(msg.body.get("config"))
            if any(i >= len(msg.fds) for i in cfg.fd_index.values()):
                raise ProtocolError("launch: fd index out of range")
            pid = self.spawn(cfg, msg.fds)
        except (ProtocolError, OSError) as exc:
            protocol.send(self.sock, protocol.OP_LAUNCH_FAILED, {"detail": str(exc)})
        else:
            protocol.send(self.sock, protocol.OP_LAUNCHED, {"pid": pid})
        finally:
            for fd in msg.fds:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.workers:
                self.workers.discard(pid)
                protocol.send(self.sock, protocol.OP_EXITED, {"pid": pid, "status": status})

    def serve(self) -> None:
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self._wake_w)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll(1000):
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 512)
                    except BlockingIOError:
                        pass
                    continue
                try:
                    msg = protocol.recv(self.sock)
                except (OSError, ProtocolError):
                    msg = None
                if msg is None:
                    self.shutdown()
                    return
                if msg.op == protocol.OP_LAUNCH:
                    self._on_launch(msg)
                else:
                    for fd_ in msg.fds:
                        os.close(fd_)
            self._reap()

    def shutdown(self) -> None:
        """The launcher is gone: no VM outlives it."""
        for pid in list(self.workers):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.workers and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.workers.discard(pid)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="isovisor-zygote")
    p.add_argument("--fd", type=int, required=True, help="SEQPACKET socket to the launcher")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="isovisor: %(name)s: %(message)s")
    sock = socket.socket(fileno=args.fd)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
        # Everything below imports from a read-only view of the code (and writes no
        # bytecode: the launcher sets PYTHONDONTWRITEBYTECODE).
        mounts.read_only_code_view(mounts.code_paths())
        facts, info = prepare()
    except Exception as exc:
        protocol.send(sock, OP_ZYGOTE_FAILED, {"detail": f"{type(exc).__name__}: {exc}"})
        return 1
    protocol.send(sock, OP_HELLO, info)
    Zygote(sock, facts).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
