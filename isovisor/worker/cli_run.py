"""`isovisor run` through a jailed worker: the CLI is the host side."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from types import FrameType

from isovisor.cli.errors import EXIT_ERROR
from isovisor.worker.errors import BuildError, JailError, WorkerError
from isovisor.worker.launcher import Launcher, LaunchRequest

NO_JAIL_WARNING = (
    "isovisor: WARNING: --no-jail: the VM runs inside this process, as this user, with no "
    "namespaces, no seccomp and no cgroups. For debugging the VMM only; never with an "
    "untrusted guest."
)


class _Inputs:
    """The serial streams, opened on the host side (the worker opens no path)."""

    def __init__(self) -> None:
        self.close_later: list[int] = []
        self.sock: socket.socket | None = None

    def serial_out(self, target: str) -> int | None:
        if target == "stdio":
            sys.stdout.flush()
            return 1
        if target == "none":
            return None
        path = target[5:]
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BuildError(f"--serial file {path}: {exc.strerror}") from None
        self.close_later.append(fd)
        return fd

    def serial_in(self, source: str) -> int | None:
        if source == "none":
            return None
        if source == "stdin":
            try:
                os.fstat(0)
            except OSError:
                return None
            return 0
        if source.startswith("unix:") and len(source) > 5:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.connect(source[5:])
            except OSError as exc:
                sock.close()
                raise BuildError(f"--serial-input {source}: cannot connect: "
                                 f"{exc.strerror}") from None
            self.sock = sock
            return sock.fileno()
        raise BuildError(f"--serial-input {source!r}: expected stdin, unix:PATH or none")

    def close(self) -> None:
        for fd in self.close_later:
            os.close(fd)
        if self.sock is not None:
            self.sock.close()


def run_jailed(args: argparse.Namespace, serial_input: str) -> int:
    inputs = _Inputs()
    launcher = Launcher()
    events = None
    if getattr(args, "security_events", None) is not None:
        # The worker's device events (forwarded over its control socket) and its death by
        # seccomp both pass through launcher.security_events.
        from isovisor.security.audit.event_channel import ChannelWriter

        try:
            events = ChannelWriter(args.security_events)
        except OSError as exc:
            print(f"isovisor: --security-events {args.security_events}: {exc.strerror}",
                  file=sys.stderr)
            return EXIT_ERROR
        launcher.security_events.listeners.append(events)
    try:
        try:
            req = LaunchRequest(
                kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline,
                memory=args.memory, vcpus=args.vcpus, protocol=args.boot_protocol,
                serial_out_fd=inputs.serial_out(args.serial),
                serial_in_fd=inputs.serial_in(serial_input), rng=bool(args.rng),
                disks=tuple(args.disk), nets=tuple(args.net), vsock=args.vsock,
                test_hook=getattr(args, "test_hook", None),
            )
            if args.serial_rate is not None:
                req.serial_rate = float(args.serial_rate)
            handle = launcher.launch(req)
        except BuildError as exc:
            print(f"isovisor: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except (JailError, WorkerError) as exc:
            print(f"isovisor: the VM did not start: {exc}", file=sys.stderr)
            if os.geteuid() != 0:
                print("isovisor: the worker jail needs root (cgroups, uid switch, mounts); "
                      "--no-jail runs the VM unjailed, for debugging only", file=sys.stderr)
            return EXIT_ERROR
        finally:
            inputs.close()  # the worker has its own copies now

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            handle.stop(f"stopped by {signal.Signals(signum).name}")

        old_int = signal.signal(signal.SIGINT, on_signal)
        old_term = signal.signal(signal.SIGTERM, on_signal)
        try:
            result = handle.wait(args.timeout)
            if result is None:
                handle.stop(f"--timeout {args.timeout} s reached")
                result = handle.wait(30)
            if result is None:
                handle.kill()
                result = handle.wait()
            assert result is not None
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    finally:
        launcher.close()
        if events is not None:
            events.close()
    sys.stdout.flush()
    print(f"isovisor: {result.describe()}", file=sys.stderr)
    if args.verbose:
        for key, value in sorted(handle.report.items()):
            print(f"isovisor: jail: {key}: {value}", file=sys.stderr)
    return result.exit_status
