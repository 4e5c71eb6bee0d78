"""`isovisor tenant`: create, list, show, delete tenants; show and set quotas."""

from __future__ import annotations

import argparse

from isovisor.cli.config import add_client_options, api, field, show, show_fields

TENANT_COLUMNS = [
    ("NAME", field("name")),
    ("VCPUS", lambda t: t["quota"]["maxVcpus"]),
    ("MEMORY MiB", lambda t: t["quota"]["maxMemoryMiB"]),
    ("VMS", lambda t: t["quota"]["maxVms"]),
    ("CREATED", lambda t: t["createdAt"][:19]),
    ("DESCRIPTION", field("description")),
]


def _quota_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--max-vcpus", type=int, required=required, help="vCPUs across all VMs")
    p.add_argument("--max-memory", type=int, required=required, metavar="MiB",
                   help="MiB of guest memory across all VMs")
    p.add_argument("--max-vms", type=int, required=required, help="number of VMs")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tenant", help="tenants and their quotas (management API)")
    cmds = p.add_subparsers(dest="tenant_command", metavar="COMMAND", required=True)

    create = cmds.add_parser("create", help="create a tenant (Host Admin)")
    create.add_argument("name")
    create.add_argument("--description", default="")
    _quota_options(create, required=False)
    create.set_defaults(handler=cmd_create)

    lst = cmds.add_parser("list", help="tenants you can see")
    lst.set_defaults(handler=cmd_list)

    sh = cmds.add_parser("show", help="a tenant, its quota and usage")
    sh.add_argument("name")
    sh.set_defaults(handler=cmd_show)

    delete = cmds.add_parser("delete", help="delete an empty tenant (Host Admin)")
    delete.add_argument("name")
    delete.set_defaults(handler=cmd_delete)

    quota = cmds.add_parser("quota", help="set a tenant's quota (Host Admin)")
    quota.add_argument("name")
    _quota_options(quota, required=True)
    quota.set_defaults(handler=cmd_quota)

    for c in (create, lst, sh, delete, quota):
        add_client_options(c)


def cmd_create(args: argparse.Namespace) -> int:
    body: dict[str, object] = {"name": args.name, "description": args.description}
    if any(v is not None for v in (args.max_vcpus, args.max_memory, args.max_vms)):
        body["quota"] = {"maxVcpus": args.max_vcpus if args.max_vcpus is not None else 8,
                         "maxMemoryMiB": args.max_memory if args.max_memory is not None
                         else 8192,
                         "maxVms": args.max_vms if args.max_vms is not None else 10}
    with api(args) as client:
        show(args, client.post("/v1/tenants", json=body), TENANT_COLUMNS)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with api(args) as client:
        show(args, client.list_all("/v1/tenants"), TENANT_COLUMNS)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with api(args) as client:
        tenant = client.get(f"/v1/tenants/{args.name}")
        quota = client.get(f"/v1/tenants/{args.name}/quota")
    q, u = quota["quota"], quota["usage"]
    show_fields(args, {
        "name": tenant["name"], "description": tenant["description"],
        "created": tenant["createdAt"],
        "vcpus": f"{u['maxVcpus']} of {q['maxVcpus']}",
        "memory MiB": f"{u['maxMemoryMiB']} of {q['maxMemoryMiB']}",
        "VMs": f"{u['maxVms']} of {q['maxVms']}",
    })
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with api(args) as client:
        client.delete(f"/v1/tenants/{args.name}")
    print(f"tenant {args.name!r} deleted")
    return 0


def cmd_quota(args: argparse.Namespace) -> int:
    body = {"maxVcpus": args.max_vcpus, "maxMemoryMiB": args.max_memory,
            "maxVms": args.max_vms}
    with api(args) as client:
        out = client.put(f"/v1/tenants/{args.name}/quota", json=body)
    q, u = out["quota"], out["usage"]
    print(f"tenant {args.name!r}: vCPUs {u['maxVcpus']}/{q['maxVcpus']}, memory "
          f"{u['maxMemoryMiB']}/{q['maxMemoryMiB']} MiB, VMs {u['maxVms']}/{q['maxVms']}")
    return 0
