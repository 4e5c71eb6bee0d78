"""The demo's tenant segmentation step (issue #9), through the mutual-TLS API: each tenant
makes a virtual network with the same CIDR and an encrypted disk, and boots a VM with a
NIC on that network and that disk attached; the other tenant cannot name either; deleting
a disk shreds it. The host side (which namespace a NIC's TAP is in, the disk's image file,
what is left) is read from the daemon's own objects, as its operator would on the host."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from isovisor.api.client import ApiClient, ApiError
from isovisor.host.daemon import Daemon

SEGMENT_CIDR = "10.0.0.0/24"


def netns_prefix() -> str:
    """A network namespace prefix of the demo's own, new each run: nothing it makes can
    collide with the host's (or another daemon's) namespaces."""
    return f"isovisor-demo-{secrets.token_hex(4)}"


def _refusal(client: ApiClient, path: str, body: dict[str, Any]) -> ApiError | None:
    """The API's refusal of POST `path` (None: it was accepted)."""
    try:
        client.post(path, json=body)
    except ApiError as exc:
        return exc
    return None


def _volumes(daemon: Daemon, tenant: str) -> list[Path]:
    return sorted((daemon.config.state_dir / "volumes" / tenant).glob("*.img"))


def segmentation(daemon: Daemon, clients: dict[str, ApiClient], tenants: dict[str, str],
                 wait: Callable[[ApiClient, str, str], Any]) -> bool:
    """Run the step; True when every check held. `tenants` maps tenant to owner, `wait`
    waits for a VM to stop (the hello guest ignores its NIC and disk and resets)."""
    ok = True
    networks = daemon.service.networks
    for tenant, owner in tenants.items():
        c = clients[owner]
        net = c.post(f"/v1/tenants/{tenant}/networks",
                     json={"name": f"{tenant}-lan", "cidr": SEGMENT_CIDR})
        disk = c.post(f"/v1/tenants/{tenant}/disks",
                      json={"name": f"{tenant}-data", "sizeMiB": 1})
        vm = c.post(f"/v1/tenants/{tenant}/vms", json={
            "name": f"{tenant}-vm-net", "kernel": "kernel", "vcpus": 1, "memoryMiB": 64,
            "nics": [{"network": net["name"]}], "disks": [{"disk": disk["name"]}]})
        (nic,) = vm["nics"]
        ns = networks.plumbing.netns(networks.store.get(tenant, net["name"]).plan)
        print(f"{owner}: network {net['name']!r} {net['cidr']}, disk {disk['name']!r} "
              f"({disk['sizeMiB']} MiB, {disk['encryption']}); VM {vm['name']!r} NIC "
              f"{nic['mac']} {nic['ip']} in namespace {ns}")
        _console, info = wait(c, tenant, vm["name"])
        ok &= nic["ip"] == "10.0.0.2" and info["state"] == "stopped" and \
            "start failed" not in (info.get("lastStopReason") or "")

    c = clients[tenants["green"]]
    attempts: tuple[tuple[str, dict[str, Any]], ...] = (
        ("network", {"nics": [{"network": "blue-lan"}]}),
        ("disk", {"disks": [{"disk": "blue-data"}]}))
    for what, body in attempts:
        err = _refusal(c, "/v1/tenants/green/vms", {
            "name": "green-spy", "kernel": "kernel", "memoryMiB": 64, "start": False, **body})
        print(f"{tenants['green']} attaches alice's {what}: "
              + (f"{err.status} {err.message}" if err else "ACCEPTED (this would be a bug)"))
        ok &= err is not None and err.status == 400 and "not found in tenant 'green'" in \
            err.message

    for tenant, owner in tenants.items():
        clients[owner].delete(f"/v1/tenants/{tenant}/vms/{tenant}-vm-net")
    alice = clients[tenants["blue"]]
    (image,) = _volumes(daemon, "blue")
    r = alice.raw("DELETE", "/v1/tenants/blue/disks/blue-data")
    gone = not image.exists()
    print(f"alice deletes 'blue-data': {r.status_code} (key destroyed, tenant key rotated); "
          f"its image {image.name} " + ("is gone" if gone else "IS STILL THERE (a bug)"))
    ok &= r.status_code == 204 and gone
    clients[tenants["green"]].delete("/v1/tenants/green/disks/green-data")
    for tenant, owner in tenants.items():
        clients[owner].delete(f"/v1/tenants/{tenant}/networks/{tenant}-lan")
    left = networks.inventory()
    print("networks deleted: " + ("no namespace, bridge, TAP, nft table or dnsmasq left"
                                  if left.empty else f"LEFT BEHIND: {left}"))
    return ok and left.empty


def sweep(daemon: Daemon) -> None:
    """After the daemon stopped: delete whatever namespace of the demo's prefix is left
    (an interrupted run), with its dnsmasq, links and tables."""
    plumbing = daemon.service.networks.plumbing
    for network_id in plumbing.network_ids():
        plumbing.remove_namespace(network_id)
