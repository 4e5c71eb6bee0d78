"""A real API stack for tests: a CA on disk, real certificates, a HostService, and a real
uvicorn server on loopback speaking mutual TLS 1.3. Only the VM runner is inert here (the
API and RBAC are under test; the real runner is tested in tests/host)."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from isovisor.api.app import Api, create_app
from isovisor.api.server import ApiServer, TlsFiles
from isovisor.api.tls import client_context
from isovisor.host.runner import Launch, VmExit, VmHandle, VmMetrics
from isovisor.host.service import HostService
from isovisor.security.pki import CertificateAuthority
from tests.devices.virtio import netns


class InertRunner:
    """Satisfies VmRunner without processes: VMs 'run' until stopped."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.running: set[int] = set()
        self.launches: list[Launch] = []
        self._next = 1

    def start(self, launch: Launch) -> VmHandle:
        self.launches.append(launch)
        pid = self._next
        self._next += 1
        self.running.add(pid)
        run_dir = self.root / launch.vm_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "console.log").write_bytes(b"inert console\n")
        return VmHandle(pid, 0, str(run_dir))

    def stop(self, handle: VmHandle, timeout: float) -> None:
        self.running.discard(handle.pid)

    def pause(self, handle: VmHandle) -> None:
        pass

    def resume(self, handle: VmHandle) -> None:
        pass

    def adopt(self, handle: VmHandle) -> bool:
        return handle.pid in self.running

    def alive(self, handle: VmHandle) -> bool:
        return handle.pid in self.running

    def exit_info(self, handle: VmHandle) -> VmExit:
        return VmExit(14, "stopped by the host")

    def console_path(self, handle: VmHandle) -> Path:
        return Path(handle.run_dir) / "console.log"

    def send_console(self, handle: VmHandle, data: bytes) -> None:
        with open(Path(handle.run_dir) / "console.log", "ab") as f:
            f.write(b"input: " + data)

    def metrics(self, handle: VmHandle) -> VmMetrics:
        return VmMetrics(cpu_seconds=0.0, rss_bytes=0, console_bytes=14)


@dataclass
class Identity:
    name: str
    cert: Path
    key: Path
    serial: int


@dataclass
class Stack:
    root: Path
    ca: CertificateAuthority
    service: HostService
    api: Api
    server: ApiServer
    ids: dict[str, Identity] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.server.port}"

    def identity(self, name: str, ca: CertificateAuthority | None = None,
                 validity: dt.timedelta | None = None,
                 not_before: dt.datetime | None = None) -> Identity:
        issuer = ca or self.ca
        kwargs: dict[str, object] = {}
        if validity is not None:
            kwargs["validity"] = validity
        if not_before is not None:
            kwargs["not_before"] = not_before
        issued = issuer.issue(name, **kwargs)  # type: ignore[arg-type]
        d = self.root / "clients" / f"{name}-{issued.serial:x}"
        d.mkdir(parents=True)
        (d / "cert.pem").write_bytes(issued.cert_pem)
        (d / "key.pem").write_bytes(issued.key_pem)
        ident = Identity(name, d / "cert.pem", d / "key.pem", issued.serial)
        self.ids[name] = ident
        return ident

    def cli_admin_config(self, directory: Path) -> Path:
        """A Host Admin `cli-admin` for the `isovisor` CLI: its certificate and key issued
        by `isovisor ca issue` into `directory`, and the client.toml that command writes."""
        from isovisor.cli.main import main

        config = directory / "client.toml"
        assert main(["ca", "--dir", str(self.ca.directory), "issue", "cli-admin", "--out",
                     str(directory), "--write-config", str(config), "--endpoint",
                     self.url]) == 0
        self.service.bootstrap_admin("cli-admin")
        return config

    def client(self, ident: Identity | None) -> httpx.Client:
        ctx = client_context(self.ca.cert_path, ident.cert if ident else None,
                             ident.key if ident else None)
        return httpx.Client(base_url=self.url, verify=ctx, timeout=10.0)

    def close(self) -> None:
        self.server.stop()
        self.service.close()
        netns.remove_tree(self.service.networks.netns_prefix)


def stack_network_namespace() -> str:
    """A network namespace prefix of this test process for a HostService's tenant networks
    (network ID gets namespace PREFIX-ID when a test creates it), swept like every
    `isvtest-PID-...` namespace, so no stack ever touches the host's own `isovisor-*`."""
    return f"{netns.PREFIX}{os.getpid()}-{next(netns._counter)}"


def build_stack(root: Path, runner: object | None = None) -> Stack:
    ca = CertificateAuthority.init(root / "ca")
    server = ca.issue("isovisord", server=True, dns_names=["localhost"],
                      ip_addresses=["127.0.0.1"])
    (root / "server").mkdir()
    cert, key = root / "server" / "cert.pem", root / "server" / "key.pem"
    cert.write_bytes(server.cert_pem)
    key.write_bytes(server.key_pem)
    service = HostService(root / "state",
                          runner=runner or InertRunner(root / "run"),  # type: ignore[arg-type]
                          network_namespace=stack_network_namespace())
    service.open()
    tls = TlsFiles(ca.cert_path, ca.crl_path, cert, key)
    revocations = tls.revocation_list()
    api = create_app(service, revocations)
    api_server = ApiServer(api, tls, revocations)
    api_server.start()
    return Stack(root, ca, service, api, api_server)
