"""`isovisor run`: boot a kernel in a new VM and wait until it stops."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path
from types import FrameType

from isovisor.cli.disk_option import SYNTAX as DISK_SYNTAX
from isovisor.cli.disk_option import parse_disk_option
from isovisor.cli.errors import EXIT_ERROR, EXIT_USAGE
from isovisor.cli.net_option import SYNTAX as NET_SYNTAX
from isovisor.cli.net_option import net_option
from isovisor.cli.vsock_option import SYNTAX as VSOCK_SYNTAX
from isovisor.cli.vsock_option import vsock_option
from isovisor.kvm import KvmError
from isovisor.kvm.system import KVM_DEVICE
from isovisor.memory import GuestMemoryError
from isovisor.vmm.stop import StopReason

EXIT_STATUS_HELP = "exit status: " + ", ".join(
    f"{r.exit_status} {r.name.lower().replace('_', ' ')}" for r in StopReason
) + f", {EXIT_ERROR} error before the guest ran, {EXIT_USAGE} usage error"

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'256M', '1G', '262144K'; a bare number means MiB."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 256M or 1G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _serial(text: str) -> str:
    if text in ("stdio", "none") or (text.startswith("file:") and len(text) > 5):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected stdio, file:PATH or none")



def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="boot a kernel in a new VM and wait until it stops",
        description="Boot a kernel (PVH ELF, vmlinux or bzImage) in a new VM; the guest's "
        "COM1 goes to stdout. " + EXIT_STATUS_HELP + ".",
    )
    run.add_argument("--kernel", required=True, type=Path, help="kernel image")
    run.add_argument("--initrd", type=Path, help="initial ramdisk")
    run.add_argument("--cmdline", default="", help="kernel command line")
    run.add_argument("--memory", type=parse_size, default=parse_size("256M"),
                     help="guest RAM, e.g. 256M or 1G (default 256M)")
    run.add_argument("--vcpus", type=_positive_int, default=1, help="number of vCPUs (default 1)")
    run.add_argument("--serial", type=_serial, default="stdio",
                     help="COM1: stdio (default), file:PATH or none")
    run.add_argument("--serial-input", default=None, metavar="SOURCE",
                     help="what feeds COM1: stdin (default with --serial stdio), "
                     "unix:PATH (connect to a Unix stream socket) or none")
    run.add_argument("--rng", action="store_true",
                     help="add a virtio-rng device (entropy from the host's getrandom)")
    run.add_argument("--disk", action="append", default=[], type=parse_disk_option,
                     metavar=DISK_SYNTAX,
                     help="add a virtio-blk device over a raw image (repeatable; vda, vdb, "
                     "... in order); readonly, direct (O_DIRECT), serial=ID, rate limits "
                     "bw=RATE (bytes/s, e.g. 10M) and iops=N (requests/s)")
    run.add_argument("--net", action="append", default=[], type=net_option, metavar=NET_SYNTAX,
                     help="add a virtio-net device on an existing TAP (repeatable); mac= "
                     "(default: random, locally administered), rate limits rx-bw/tx-bw=RATE "
                     "(bytes/s, e.g. 10M) and rx-ops/tx-ops=N (frames/s)")
    run.add_argument("--vsock", type=vsock_option, default=None, metavar=VSOCK_SYNTAX,
                     help="add a virtio-vsock device with guest CID N: host clients connect "
                     "to the Unix socket PATH and write 'CONNECT <port>\\n'; guest "
                     "connections to host port P go to PATH_P (docs/VSOCK.md)")
    run.add_argument("--boot-protocol", choices=["auto", "pvh", "linux"], default="auto",
                     help="auto (default): PVH when the ELF has a PVH note, else Linux")
    run.add_argument("--timeout", type=float, default=None,
                     help="stop the guest after this many seconds (host request)")
    run.add_argument("--serial-rate", type=parse_size, default=None,
                     help="cap on guest serial output per second (default 1M)")
    run.add_argument("-v", "--verbose", action="store_true", help="log VMM events to stderr")
    run.add_argument("--security-events", type=Path, default=None, metavar="FILE",
                     help="append the VM's security events (seccomp kill, a virtio device "
                     "put into NEEDS_RESET, ...) to FILE as JSON lines (isovisord reads "
                     "them into its audit log; docs/AUDIT.md)")
    run.add_argument("--test-hook", default=None, help=argparse.SUPPRESS)  # tests only
    run.add_argument("--no-jail", action="store_true",
                     help="DEBUGGING ONLY: run the VM in this process, without the jailed "
                     "worker (no namespaces, seccomp, cgroups or uid switch); prints a warning")
    run.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from isovisor.kvm import Kvm
    from isovisor.vmm.boot.errors import BootError
    from isovisor.vmm.builder import Machine, SerialSpec, VmSpec
    from isovisor.vmm.vm import VmError

    serial = SerialSpec(target=args.serial)
    if args.serial_rate is not None:
        serial = SerialSpec(target=args.serial, rate=float(args.serial_rate))
    serial_input = args.serial_input or ("stdin" if args.serial == "stdio" else "none")
    if not args.no_jail:  # the default: the VM runs in its own jailed worker process
        from isovisor.worker.cli_run import run_jailed

        return run_jailed(args, serial_input)
    from isovisor.worker.cli_run import NO_JAIL_WARNING

    print(NO_JAIL_WARNING, file=sys.stderr)
    spec = VmSpec(
        kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline, memory=args.memory,
        vcpus=args.vcpus, protocol=args.boot_protocol, serial=serial, serial_input=serial_input,
        rng=args.rng, disks=tuple(args.disk), nets=tuple(args.net), vsock=args.vsock,
    )
    try:
        kvm = Kvm(os.environ.get("ISOVISOR_KVM_DEVICE", KVM_DEVICE))
        machine = Machine(spec, kvm)
    except (KvmError, VmError, BootError, GuestMemoryError) as exc:
        print(f"isovisor: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.security_events is not None:
        from isovisor.security.audit.event_channel import ChannelWriter

        machine.vm.security_events.listeners.append(ChannelWriter(args.security_events))

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        machine.vm.stop(f"stopped by {signal.Signals(signum).name}")

    old_int = signal.signal(signal.SIGINT, on_signal)
    old_term = signal.signal(signal.SIGTERM, on_signal)
    try:
        machine.start()
        deadline = args.timeout
        event = machine.wait(deadline)
        if event is None:
            machine.vm.stop(f"--timeout {deadline} s reached")
            event = machine.wait()
        assert event is not None
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        machine.close()
    sys.stdout.flush()
    print(f"isovisor: {event.describe()}", file=sys.stderr)
    return event.reason.exit_status


