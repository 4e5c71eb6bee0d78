"""`isovisor role`: role definitions and role assignments (Azure RBAC style)."""

from __future__ import annotations

import argparse
import uuid

from isovisor.cli.config import add_client_options, api, field, show

DEF_COLUMNS = [("NAME", field("name")), ("SCOPE", field("scope")),
               ("BUILTIN", lambda r: "yes" if r["builtin"] else "no"),
               ("ACTIONS", lambda r: ",".join(r["actions"])),
               ("NOT ACTIONS", lambda r: ",".join(r["notActions"]) or None)]
ASSIGN_COLUMNS = [("ID", field("id")), ("PRINCIPAL", field("principal")),
                  ("ROLE", field("role")), ("SCOPE", field("scope")),
                  ("BY", field("createdBy"))]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("role", help="roles and role assignments (management API)")
    cmds = p.add_subparsers(dest="role_command", metavar="COMMAND", required=True)
    every = []

    lst = cmds.add_parser("list", help="role definitions assignable at a scope")
    lst.add_argument("--scope", default="/", help="scope (default /)")
    lst.set_defaults(handler=cmd_list)
    every.append(lst)

    create = cmds.add_parser("create", help="define a custom role at a scope")
    create.add_argument("name")
    create.add_argument("--scope", required=True, help="e.g. /tenants/blue")
    create.add_argument("--actions", required=True, help="comma-separated, e.g. vms/read,vms/*")
    create.add_argument("--not-actions", default="", help="comma-separated")
    create.add_argument("--description", default="")
    create.set_defaults(handler=cmd_create)
    every.append(create)

    delete = cmds.add_parser("delete", help="delete a custom role")
    delete.add_argument("name")
    delete.add_argument("--scope", required=True)
    delete.set_defaults(handler=cmd_delete)
    every.append(delete)

    assign = cmds.add_parser("assign", help="give a principal a role at a scope")
    assign.add_argument("principal")
    assign.add_argument("role", help='e.g. "VM Operator"')
    assign.add_argument("--scope", required=True, help="/, /tenants/T or /tenants/T/vms/V")
    assign.set_defaults(handler=cmd_assign)
    every.append(assign)

    assignments = cmds.add_parser("assignments", help="role assignments at or below a scope")
    assignments.add_argument("--scope", default="/", help="scope (default /)")
    assignments.set_defaults(handler=cmd_assignments)
    every.append(assignments)

    unassign = cmds.add_parser("unassign", help="remove a role assignment by id")
    unassign.add_argument("id")
    unassign.set_defaults(handler=cmd_unassign)
    every.append(unassign)

    whoami = cmds.add_parser("whoami", help="who the API thinks you are, and your roles")
    whoami.set_defaults(handler=cmd_whoami)
    every.append(whoami)
    for c in every:
        add_client_options(c)


def _split(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def cmd_list(args: argparse.Namespace) -> int:
    with api(args) as client:
        show(args, client.get("/v1/roleDefinitions", params={"scope": args.scope})["items"],
             DEF_COLUMNS)
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "description": args.description, "scope": args.scope,
            "actions": _split(args.actions), "notActions": _split(args.not_actions)}
    with api(args) as client:
        show(args, client.post("/v1/roleDefinitions", json=body,
                               headers={"Idempotency-Key": uuid.uuid4().hex}), DEF_COLUMNS)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with api(args) as client:
        client.delete(f"/v1/roleDefinitions/{args.name}", params={"scope": args.scope})
    print(f"role {args.name!r} deleted")
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    body = {"principal": args.principal, "role": args.role, "scope": args.scope}
    with api(args) as client:
        show(args, client.post("/v1/roleAssignments", json=body,
                               headers={"Idempotency-Key": uuid.uuid4().hex}), ASSIGN_COLUMNS)
    return 0


def cmd_assignments(args: argparse.Namespace) -> int:
    with api(args) as client:
        show(args, client.list_all("/v1/roleAssignments", {"scope": args.scope}),
             ASSIGN_COLUMNS)
    return 0


def cmd_unassign(args: argparse.Namespace) -> int:
    with api(args) as client:
        client.delete(f"/v1/roleAssignments/{args.id}")
    print(f"role assignment {args.id} removed")
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    with api(args) as client:
        me = client.get("/v1/whoami")
    print(f"principal {me['principal']} (certificate {me['certificateSerial'][:16]}, "
          f"valid until {me['certificateNotAfter'][:19]}) from {me['client']}")
    show(args, me["assignments"], ASSIGN_COLUMNS)
    return 0
