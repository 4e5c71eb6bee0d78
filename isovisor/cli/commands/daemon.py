"""`isovisor daemon run`: start isovisord in the foreground."""

from __future__ import annotations

import argparse
import logging


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from isovisor.host.config import add_arguments

    p = sub.add_parser("daemon", help="the host daemon, isovisord",
                       description="Run isovisord: state, VMs and the mutual-TLS API.")
    cmds = p.add_subparsers(dest="daemon_command", metavar="COMMAND", required=True)
    run = cmds.add_parser("run", help="run isovisord in the foreground")
    add_arguments(run)
    run.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from isovisor.host import daemon

    logging.getLogger().setLevel(logging.INFO if args.verbose else logging.WARNING)
    return daemon.run(args)
