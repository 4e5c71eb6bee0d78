"""`isovisor` command line: subcommands live in isovisor/cli/commands/, one module each,
each with `register(subparsers)`; they are discovered, so adding a command touches no
shared file."""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from isovisor import __version__
from isovisor.cli import commands
from isovisor.cli.errors import EXIT_ERROR, EXIT_USAGE, CliError
from isovisor.kvm import KvmUnavailableError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="isovisor", description="isovisor: a security-first hypervisor on Linux KVM"
    )
    p.add_argument("--version", action="version", version=f"isovisor {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="isovisor: %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args))
    except (KvmUnavailableError, CliError) as exc:
        print(f"isovisor: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_USAGE + 128


if __name__ == "__main__":
    sys.exit(main())
