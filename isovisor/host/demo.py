"""`python -m isovisor.host.demo`: the management plane end to end.

Starts isovisord with its embedded defaults (a fresh state directory, a new host CA, a
bootstrap Host Admin) and its launch gate on: the signed code manifest and launch policy
`make setup` wrote to .isovisor/ (isovisor integrity dev-setup), measured into a swtpm the
daemon starts itself. Then, through the mutual-TLS API only:
  1. the Host Admin creates two tenants, blue and green, with quotas;
  2. issues a certificate for each tenant's administrator and makes each one Owner of
     their own tenant;
  3. each administrator uploads a kernel image and boots one VM in their tenant (each
     launch passes the gate: code files, measurements, PCRs against the event log, policy);
  4. the daemon's policy is replaced by one, properly signed, for another release of
     isovisor: the next VM start is refused (503 LaunchRefused, naming the measurement)
     and the audit log holds the refusal; the demo's own copy of the policy is restored;
  5. each administrator lists what they can see: their own tenant and VM only; asking
     for the other tenant answers 404, exactly as for a tenant that does not exist;
  6. tenant segmentation (#9): each tenant makes a network with the same CIDR and an
     encrypted disk, and boots a VM with a NIC on it and the disk attached (same address,
     separate network namespaces); the other tenant cannot attach either; deleting a disk
     shreds it. The daemon's network namespace prefix is new each run, and the demo
     leaves no namespace, nft table, dnsmasq or TAP behind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from isovisor.api.client import ApiClient, ApiError, ClientConfig
from isovisor.cli.config import table
from isovisor.host.config import DaemonConfig
from isovisor.host.daemon import Daemon
from isovisor.host.demo_segmentation import SEGMENT_CIDR, netns_prefix, segmentation, sweep
from isovisor.security.audit.export import read_entries
from isovisor.security.audit.hooks import AUDIT_DIR_NAME
from isovisor.security.audit.recorders import SECURITY_LAUNCH_GATE, security_kind
from isovisor.security.integrity.devsetup import DevIntegrity
from isovisor.security.integrity.signing import load_private_key, write_signed
from isovisor.security.pki.files import PRIVATE_MODE, PUBLIC_MODE, write_atomic

REPO = Path(__file__).resolve().parents[2]
DEFAULT_KERNEL = REPO / "guests" / "build" / "hello.elf"
DEFAULT_INTEGRITY = REPO / ".isovisor"
TENANTS = {"blue": "alice", "green": "bob"}
BOOT_TIMEOUT = 60.0


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def issue_client(daemon: Daemon, name: str, out: Path) -> ClientConfig:
    issued = daemon.ca.issue(name)
    cert, key = out / f"{name}.crt", out / f"{name}.key"
    write_atomic(key, issued.key_pem, PRIVATE_MODE)
    write_atomic(cert, issued.cert_pem, PUBLIC_MODE)
    return ClientConfig(daemon.endpoint, daemon.ca.cert_path, cert, key)


def wait_for_console(client: ApiClient, tenant: str, vm: str) -> tuple[bytes, dict[str, Any]]:
    """Console output until the VM stops (hello resets at once) or the timeout."""
    deadline = time.monotonic() + BOOT_TIMEOUT
    out = b""
    while time.monotonic() < deadline:
        r = client.raw("GET", f"/v1/tenants/{tenant}/vms/{vm}/console",
                       params={"offset": len(out), "wait": 2})
        out += r.content
        info = client.get(f"/v1/tenants/{tenant}/vms/{vm}")
        if info["state"] == "stopped" and not r.content:
            return out, info
    return out, client.get(f"/v1/tenants/{tenant}/vms/{vm}")


def integrity_table(dev: DevIntegrity, state: Path) -> dict[str, str]:
    """The daemon's [integrity] table: .isovisor's files, but a copy of the policy (step 4
    replaces it), and always a swtpm (a demo never extends the host TPM's PCRs)."""
    policy = state / "policy.json"
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copyfile(dev.policy, policy)
    return {**dev.config_table(), "policy": str(policy), "tpm": "swtpm"}


def last_record(state: Path, kind: str) -> dict[str, Any] | None:
    found = None
    for _, entry in read_entries(state / AUDIT_DIR_NAME):
        if entry.type.value == "record" and entry.kind == kind:
            found = {"seq": entry.seq, "ts": entry.ts, "kind": entry.kind,
                     **{k: v for k, v in entry.fields["data"].items() if v is not None}}
    return found


def refused_launch(daemon: Daemon, dev: DevIntegrity, client: ApiClient, tenant: str) -> bool:
    """Step 4: a policy for another release refuses the next launch; True when it did,
    with the precise reason and an audit record."""
    policy = Path(daemon.config.extra["integrity"]["policy"])
    original = policy.read_bytes()
    doc = json.loads(original)["document"]
    other = hashlib.sha256(b"isovisor, another release").hexdigest()
    doc["accept"]["isovisor.manifest"] = [other]
    write_signed(policy, doc, load_private_key(dev.policy_key))
    print(f"policy now accepts only manifest {other[:16]}... (signed by the policy key)")
    try:
        client.post(f"/v1/tenants/{tenant}/vms", json={
            "name": f"{tenant}-vm-2", "kernel": "kernel", "vcpus": 1, "memoryMiB": 64})
        print("demo: the launch was NOT refused (this would be a bug)", file=sys.stderr)
        return False
    except ApiError as exc:
        print(f"refused: {exc.status} {exc.code}: {exc.message}")
        ok = exc.status == 503 and exc.code == "LaunchRefused" and "isovisor.manifest" in \
            exc.message
    finally:
        policy.write_bytes(original)
    record = last_record(daemon.config.state_dir, security_kind(SECURITY_LAUNCH_GATE))
    print(f"audit record: {json.dumps(record, sort_keys=True)}")
    vm = client.post(f"/v1/tenants/{tenant}/vms/{tenant}-vm-2/start")
    print(f"policy restored: starting {vm['name']!r} again passes the gate: {vm['state']}")
    _console, info = wait_for_console(client, tenant, vm["name"])
    print(f"VM {info['name']!r} is {info['state']} ({info['lastStopReason']})")
    return ok and record is not None and record.get("scope") == \
        f"/tenants/{tenant}/vms/{tenant}-vm-2" and vm["state"] in ("running", "stopped") \
        and "start failed" not in (info.get("lastStopReason") or "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m isovisor.host.demo", description=__doc__)
    p.add_argument("--kernel", type=Path, default=DEFAULT_KERNEL,
                   help="PVH kernel each tenant boots (default guests/build/hello.elf)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="state directory (default: a new temporary one)")
    p.add_argument("--integrity-dir", type=Path, default=DEFAULT_INTEGRITY,
                   help="the development keys, manifest and policy `make setup` writes "
                   "(default .isovisor)")
    p.add_argument("--no-gate", action="store_true",
                   help="run without the launch gate (VMs are not gated)")
    args = p.parse_args(argv)
    if not args.kernel.is_file():
        print(f"demo: {args.kernel} is missing: run `make guests` first", file=sys.stderr)
        return 1
    dev = DevIntegrity(args.integrity_dir.resolve())
    if not args.no_gate and dev.missing():
        print(f"demo: {dev.missing()[0]} is missing: run `make setup` first (or "
              f"`isovisor integrity dev-setup --dir {args.integrity_dir}`)", file=sys.stderr)
        return 1
    state = args.state_dir or Path(tempfile.mkdtemp(prefix="isovisor-demo-"))
    extra = {} if args.no_gate else {"integrity": integrity_table(dev, state / "gate")}
    config = DaemonConfig(state_dir=state, listen="127.0.0.1:0", bootstrap_admin="admin",
                          network_namespace=netns_prefix(), extra=extra)

    say(f"starting isovisord (state in {state})")
    daemon = Daemon(config)
    daemon.start()
    print(f"listening on {daemon.endpoint}: TLS 1.3 only, client certificates required")
    print(daemon.gate_line)
    if daemon.integrity is not None and daemon.integrity.report is None:
        daemon.stop()
        print("demo: the launch gate refused at start: if the code or the host changed on "
              "purpose, run `make setup` again", file=sys.stderr)
        return 1
    assert daemon.admin is not None
    admin_cfg = ClientConfig(daemon.endpoint, daemon.ca.cert_path, daemon.admin.cert,
                             daemon.admin.key)
    clients: dict[str, ApiClient] = {}
    try:
        out_dir = state / "clients"
        out_dir.mkdir(exist_ok=True, mode=0o700)
        with ApiClient(admin_cfg) as admin:
            say("Host Admin creates two tenants and their administrators")
            for tenant, owner in TENANTS.items():
                admin.post("/v1/tenants", json={
                    "name": tenant, "description": f"{owner}'s tenant",
                    "quota": {"maxVcpus": 3, "maxMemoryMiB": 512, "maxVms": 3}})
                issue_client(daemon, owner, out_dir)
                admin.post("/v1/roleAssignments", json={
                    "principal": owner, "role": "Owner", "scope": f"/tenants/{tenant}"})
                print(f"tenant {tenant!r}: {owner} is Owner (certificate in {out_dir})")
            print(table(admin.list_all("/v1/roleAssignments"), [
                ("PRINCIPAL", lambda a: a["principal"]), ("ROLE", lambda a: a["role"]),
                ("SCOPE", lambda a: a["scope"])]))

        clients = {owner: ApiClient(ClientConfig(daemon.endpoint, daemon.ca.cert_path,
                                                 out_dir / f"{owner}.crt",
                                                 out_dir / f"{owner}.key"))
                   for owner in TENANTS.values()}
        for tenant, owner in TENANTS.items():
            say(f"{owner} boots a VM in {tenant}")
            c = clients[owner]
            c.put(f"/v1/tenants/{tenant}/images/kernel", content=args.kernel.read_bytes(),
                  headers={"content-type": "application/octet-stream"})
            vm = c.post(f"/v1/tenants/{tenant}/vms", json={
                "name": f"{tenant}-vm", "kernel": "kernel", "cmdline": f"tenant={tenant}",
                "vcpus": 1, "memoryMiB": 64}, headers={"Idempotency-Key": f"demo-{tenant}"})
            print(f"created {vm['name']!r}: {vm['state']}")
            console, info = wait_for_console(c, tenant, vm["name"])
            print("console:\n  " + console.decode(errors="replace").strip()
                  .replace("\r", "").replace("\n", "\n  "))
            print(f"VM {info['name']!r} is {info['state']}"
                  + (f" ({info['lastStopReason']})" if info["lastStopReason"] else ""))

        if daemon.integrity is not None:
            say("the launch gate refuses a policy for another release of isovisor")
            if not refused_launch(daemon, dev, clients["alice"], "blue"):
                print("demo: launch gate check FAILED", file=sys.stderr)
                return 1

        say("what each administrator can see")
        for tenant, owner in TENANTS.items():
            c = clients[owner]
            tenants = [t["name"] for t in c.list_all("/v1/tenants")]
            vms = [v["name"] for v in c.list_all(f"/v1/tenants/{tenant}/vms")]
            other = next(t for t in TENANTS if t != tenant)
            status = 200
            try:
                c.get(f"/v1/tenants/{other}/vms")
                leak = "VISIBLE (this would be a bug)"
            except ApiError as exc:
                status, leak = exc.status, f"{exc.status} {exc.message}"
            print(f"{owner}: tenants {tenants}, VMs {vms}; {other}'s VMs -> {leak}")
            if tenants != [tenant] or status != 404:
                print("demo: isolation check FAILED", file=sys.stderr)
                return 1

        say(f"tenant segmentation: same CIDR {SEGMENT_CIDR}, networks and disks per tenant")
        if not segmentation(daemon, clients, TENANTS, wait_for_console):
            print("demo: segmentation check FAILED", file=sys.stderr)
            return 1
    finally:
        for c in clients.values():
            c.close()
        say("stopping isovisord")
        daemon.stop()
        sweep(daemon)
    print("demo complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
