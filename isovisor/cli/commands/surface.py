"""`isovisor surface [--check | --write]`: the attack-surface inventory (security/surface.json).

Without options the inventory generated from the code goes to stdout. `--check` compares it
with the checked-in file and fails, printing the difference, when they differ (CI runs the
same check); `--write` updates the checked-in file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from isovisor.cli.errors import CliError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("surface", help="the attack-surface inventory",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="fail (printing the difference) if the checked-in inventory is stale")
    mode.add_argument("--write", action="store_true", help="update the checked-in inventory")
    p.add_argument("--path", type=Path, default=None,
                   help="the inventory file (default: security/surface.json in the checkout)")
    p.set_defaults(handler=cmd_surface)


def cmd_surface(args: argparse.Namespace) -> int:
    from isovisor.security.surface import INVENTORY_PATH, SurfaceError, check, generate, write

    try:
        inventory = generate()
    except SurfaceError as exc:
        raise CliError(f"cannot generate the inventory: {exc}") from None
    if args.write:
        path = write(args.path, inventory)
        print(f"wrote {path} ({len(inventory.entries)} entries)")
        return 0
    if args.check:
        difference = check(args.path, inventory)
        if difference:
            sys.stderr.write(difference)
            raise CliError(
                f"{args.path or INVENTORY_PATH} differs from the attack surface in the code: "
                "review the change, run `isovisor surface --write`, and give every new entry "
                "a THREAT_MODEL.md row and a fuzz harness")
        print(f"{args.path or INVENTORY_PATH} is up to date ({len(inventory.entries)} entries)")
        return 0
    sys.stdout.write(inventory.dumps())
    return 0
