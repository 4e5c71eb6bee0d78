"""`isovisor vm`: VMs and images of a tenant through the management API (like `az vm`)."""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from isovisor.cli.commands.run import parse_size
from isovisor.cli.config import add_client_options, api, field, show, show_fields, tenant_of
from isovisor.cli.errors import CliError

if TYPE_CHECKING:
    from isovisor.api.client import ApiClient

VM_COLUMNS = [
    ("NAME", field("name")), ("STATE", field("state")), ("VCPUS", field("vcpus")),
    ("MEMORY MiB", field("memoryMiB")), ("KERNEL", field("kernel")),
    ("LAST STOP", field("lastStopReason")),
]
IMAGE_COLUMNS = [("NAME", field("name")), ("SIZE", field("size")),
                 ("SHA256", lambda i: i["sha256"][:16]),
                 ("CREATED", lambda i: i["createdAt"][:19])]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("vm", help="VMs and images of a tenant (management API)")
    cmds = p.add_subparsers(dest="vm_command", metavar="COMMAND", required=True)
    every: list[argparse.ArgumentParser] = []

    def cmd(name: str, help_text: str, handler: object, *, named: bool = True
            ) -> argparse.ArgumentParser:
        c = cmds.add_parser(name, help=help_text)
        if named:
            c.add_argument("name", help="VM name")
        c.add_argument("--tenant", "-t", help="tenant (default: `tenant` in the client config)")
        c.set_defaults(handler=handler)
        every.append(c)
        return c

    create = cmd("create", "create (and start) a VM", cmd_create)
    create.add_argument("--kernel", required=True, help="image name of the kernel")
    create.add_argument("--initrd", help="image name of an initial ramdisk")
    create.add_argument("--cmdline", default="", help="kernel command line")
    create.add_argument("--vcpus", type=int, default=1, help="vCPUs (default 1)")
    create.add_argument("--memory", type=parse_size, default=parse_size("256M"),
                        help="guest RAM, e.g. 256M (default 256M)")
    create.add_argument("--disk", action="append", default=[],
                        metavar="IMAGE[,readonly] | disk=NAME[,readonly]",
                        help="a virtio-blk disk (repeatable): a disk of the tenant "
                        "(`disk=NAME`, see `isovisor disk`), or an image (writable ones "
                        "become private encrypted copies)")
    create.add_argument("--rng", action="store_true", help="add a virtio-rng device")
    create.add_argument("--nic", action="append", default=[], metavar="NETWORK",
                        help="a virtio-net NIC on a network of the tenant (repeatable; fixed "
                        "MAC and IP, see `isovisor network`)")
    create.add_argument("--no-start", action="store_true", help="create it stopped")
    cmd("list", "VMs of the tenant", cmd_list, named=False)
    cmd("show", "one VM", cmd_show)
    for op in ("start", "stop", "pause", "resume"):
        cmd(op, f"{op} a VM", _operation(op))
    cmd("delete", "stop and delete a VM", cmd_delete)
    cmd("metrics", "CPU time, memory and console bytes of a VM", cmd_metrics)
    console = cmd("console", "print the VM's serial console output", cmd_console)
    console.add_argument("--follow", "-f", action="store_true",
                         help="keep printing new output until the VM stops (Ctrl-C ends)")
    console.add_argument("--send", metavar="TEXT",
                         help="type TEXT and Enter into the console first")
    console.add_argument("--interactive", "-i", action="store_true",
                         help="follow, and send each line typed on stdin")
    upload = cmd("image-upload", "upload a kernel or initrd image", cmd_image_upload)
    upload.add_argument("file", type=Path, help="the image file")
    cmd("image-list", "images of the tenant", cmd_image_list, named=False)
    cmd("image-delete", "delete an image", cmd_image_delete)
    for c in every:
        add_client_options(c)


def _base(args: argparse.Namespace) -> str:
    return f"/v1/tenants/{tenant_of(args)}"


def cmd_create(args: argparse.Namespace) -> int:
    if args.memory % (1 << 20):
        raise CliError("--memory must be a whole number of MiB")
    body = {"name": args.name, "kernel": args.kernel, "initrd": args.initrd,
            "cmdline": args.cmdline, "vcpus": args.vcpus, "memoryMiB": args.memory >> 20,
            "disks": [_disk(d) for d in args.disk], "rng": args.rng,
            "nics": [{"network": n} for n in args.nic], "start": not args.no_start}
    with api(args) as client:
        # one key per invocation: a retry inside the client never creates two VMs
        vm = client.post(f"{_base(args)}/vms", json=body,
                         headers={"Idempotency-Key": uuid.uuid4().hex})
    show(args, vm, VM_COLUMNS)
    return 0


def _disk(text: str) -> dict[str, object]:
    image, _, opts = text.partition(",")
    if opts not in ("", "readonly", "ro"):
        raise CliError(f"--disk {text!r}: expected IMAGE[,readonly] or disk=NAME[,readonly]")
    if image.startswith("disk="):
        return {"disk": image.removeprefix("disk="), "readonly": bool(opts)}
    return {"image": image, "readonly": bool(opts)}


def cmd_list(args: argparse.Namespace) -> int:
    with api(args) as client:
        show(args, client.list_all(f"{_base(args)}/vms"), VM_COLUMNS)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with api(args) as client:
        show_fields(args, client.get(f"{_base(args)}/vms/{args.name}"))
    return 0


def _operation(op: str) -> object:
    def handler(args: argparse.Namespace) -> int:
        with api(args) as client:
            vm = client.post(f"{_base(args)}/vms/{args.name}/{op}")
        show(args, vm, VM_COLUMNS)
        return 0

    return handler


def cmd_delete(args: argparse.Namespace) -> int:
    with api(args) as client:
        client.delete(f"{_base(args)}/vms/{args.name}")
    print(f"VM {args.name!r} deleted")
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    with api(args) as client:
        show_fields(args, client.get(f"{_base(args)}/vms/{args.name}/metrics"))
    return 0


def _send_lines(client: ApiClient, path: str) -> None:
    for line in sys.stdin:
        client.raw("POST", path, content=line.rstrip("\n").encode() + b"\r",
                   headers={"content-type": "application/octet-stream"})


def cmd_console(args: argparse.Namespace) -> int:
    offset = 0
    out = sys.stdout.buffer
    path = f"{_base(args)}/vms/{args.name}/console"
    follow = args.follow or args.interactive
    with api(args) as client:
        if args.send is not None:
            client.raw("POST", path, content=args.send.encode() + b"\r",
                       headers={"content-type": "application/octet-stream"})
        if args.interactive:
            threading.Thread(target=_send_lines, args=(client, path), daemon=True).start()
        while True:
            r = client.raw("GET", path, params={"offset": offset, "wait": 10 if follow else 0})
            out.write(r.content)
            out.flush()
            offset = int(r.headers.get("x-console-offset", offset + len(r.content)))
            state = r.headers.get("x-vm-state", "")
            if not follow:
                if not r.content:
                    return 0
                continue
            if not r.content and state not in ("running", "paused", "starting", "stopping"):
                print(f"\n[VM {args.name!r} is {state}]", file=sys.stderr)
                return 0
            if not r.content:
                time.sleep(0.2)


def cmd_image_upload(args: argparse.Namespace) -> int:
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror}") from exc
    with api(args) as client:
        image = client.put(f"{_base(args)}/images/{args.name}", content=data,
                           headers={"content-type": "application/octet-stream"})
    show(args, image, IMAGE_COLUMNS)
    return 0


def cmd_image_list(args: argparse.Namespace) -> int:
    with api(args) as client:
        show(args, client.list_all(f"{_base(args)}/images"), IMAGE_COLUMNS)
    return 0


def cmd_image_delete(args: argparse.Namespace) -> int:
    with api(args) as client:
        client.delete(f"{_base(args)}/images/{args.name}")
    print(f"image {args.name!r} deleted")
    return 0
