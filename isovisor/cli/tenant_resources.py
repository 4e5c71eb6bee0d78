"""The command shape of a tenant's named resources in the management API (disks,
networks: `/v1/tenants/T/<collection>`): `create NAME ...`, `list`, `show NAME`,
`delete NAME`, each with --tenant and the client options."""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from isovisor.cli.config import (
    Column,
    add_client_options,
    api,
    show,
    show_fields,
    tenant_of,
)


@dataclass(frozen=True)
class TenantResource:
    noun: str  # "disk": the command's name and how its messages name one
    collection: str  # "disks": /v1/tenants/T/<collection>
    help: str  # the command's help
    columns: Sequence[Column]  # the table of `create` and `list`
    create_help: str
    add_create_options: Callable[[argparse.ArgumentParser], None]
    create_body: Callable[[argparse.Namespace], dict[str, object]]  # besides "name"
    delete_help: str
    deleted: str = ""  # said after "<noun> 'NAME' deleted", e.g. " (its key destroyed)"

    def register(self, sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        p = sub.add_parser(self.noun, help=self.help)
        cmds = p.add_subparsers(dest=f"{self.noun}_command", metavar="COMMAND",
                                required=True)

        def cmd(name: str, help_text: str, handler: Callable[[argparse.Namespace], int], *,
                named: bool = True) -> argparse.ArgumentParser:
            c = cmds.add_parser(name, help=help_text)
            if named:
                c.add_argument("name", help=f"{self.noun} name")
            c.add_argument("--tenant", "-t",
                           help="tenant (default: `tenant` in the client config)")
            c.set_defaults(handler=handler)
            return c

        every = [
            cmd("create", self.create_help, self.create),
            cmd("list", f"{self.collection} of the tenant", self.list, named=False),
            cmd("show", f"one {self.noun}", self.show),
            cmd("delete", self.delete_help, self.delete),
        ]
        self.add_create_options(every[0])
        for c in every:
            add_client_options(c)

    def _base(self, args: argparse.Namespace) -> str:
        return f"/v1/tenants/{tenant_of(args)}/{self.collection}"

    def create(self, args: argparse.Namespace) -> int:
        with api(args) as client:
            made = client.post(self._base(args),
                               json={"name": args.name, **self.create_body(args)},
                               headers={"Idempotency-Key": uuid.uuid4().hex})
        show(args, made, self.columns)
        return 0

    def list(self, args: argparse.Namespace) -> int:
        with api(args) as client:
            show(args, client.list_all(self._base(args)), self.columns)
        return 0

    def show(self, args: argparse.Namespace) -> int:
        with api(args) as client:
            show_fields(args, client.get(f"{self._base(args)}/{args.name}"))
        return 0

    def delete(self, args: argparse.Namespace) -> int:
        with api(args) as client:
            client.delete(f"{self._base(args)}/{args.name}")
        print(f"{self.noun} {args.name!r} deleted{self.deleted}")
        return 0
