"""isovisord: `python -m isovisor.host.daemon` or `isovisor daemon run`.

Start-up: load or create the host CA, issue the server certificate if missing, re-sign
the CRL, open the state (migrations), reconcile with the VMs that survived a restart,
optionally make a bootstrap principal Host Admin (issuing its certificate once), then
serve the API over mutual TLS only. SIGTERM/SIGINT stop the API; running VMs keep
running and are re-adopted by the next start."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from isovisor.api.app import Api, create_app
from isovisor.api.pipeline import RequestObserver
from isovisor.api.server import ApiServer, SecurityEventHook, TlsFiles
from isovisor.host.config import ConfigError, DaemonConfig, add_arguments
from isovisor.host.integrity import UNGATED, HostIntegrity, open_integrity
from isovisor.host.keys.tpm_master_key import sealed_master_key
from isovisor.host.lifecycle import LifecycleEvent, LifecycleObserver
from isovisor.host.models import VmState
from isovisor.host.runner import SECURITY_EVENTS, VmHandle, VmRunner
from isovisor.host.service import MASTER_KEY_FILE, HostService
from isovisor.security.audit import AuditError
from isovisor.security.audit.hooks import HostAudit, HostAuditConfig
from isovisor.security.audit.vm_events import VmChannel, VmEventWatcher
from isovisor.security.integrity.errors import IntegrityError
from isovisor.security.pki import CertificateAuthority, PkiError
from isovisor.security.pki.files import PRIVATE_MODE, PUBLIC_MODE, write_atomic
from isovisor.security.tpm import TpmError

log = logging.getLogger("isovisord")
CRL_REFRESH_SECONDS = 24 * 3600


@dataclass(frozen=True)
class AdminCredentials:
    name: str
    cert: Path
    key: Path


def ensure_server_cert(ca: CertificateAuthority, config: DaemonConfig) -> tuple[Path, Path]:
    config.tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert, key = config.tls_dir / "server.crt", config.tls_dir / "server.key"
    if not (cert.exists() and key.exists()):
        host, _port = config.host_port
        ips = {"127.0.0.1"}
        with contextlib.suppress(ValueError):
            ips.add(str(ipaddress.ip_address(host)))
        issued = ca.issue("isovisord", server=True, dns_names=list(config.server_names),
                          ip_addresses=sorted(ips))
        write_atomic(key, issued.key_pem, PRIVATE_MODE)
        write_atomic(cert, issued.cert_pem, PUBLIC_MODE)
    return cert, key


def ensure_admin(ca: CertificateAuthority, service: HostService, config: DaemonConfig,
                 name: str) -> AdminCredentials:
    """Host Admin at / for `name`; its certificate is issued once into STATE/admin/."""
    d = config.state_dir / "admin"
    d.mkdir(exist_ok=True, mode=0o700)
    cert, key = d / f"{name}.crt", d / f"{name}.key"
    if not (cert.exists() and key.exists()):
        issued = ca.issue(name)
        write_atomic(key, issued.key_pem, PRIVATE_MODE)
        write_atomic(cert, issued.cert_pem, PUBLIC_MODE)
    service.bootstrap_admin(name)
    return AdminCredentials(name, cert, key)


class Daemon:
    """The wired daemon; `start` returns once the API listens, `stop` ends it (not VMs)."""

    def __init__(self, config: DaemonConfig, runner: VmRunner | None = None,
                 on_security_event: SecurityEventHook | None = None) -> None:
        self.config = config
        self.ca = CertificateAuthority.load_or_init(config.ca_path)
        self.ca.refresh_crl()
        cert, key = ensure_server_cert(self.ca, config)
        self.tls = TlsFiles(self.ca.cert_path, self.ca.crl_path, cert, key)
        # The audit log opens first and fails closed: no audit, no daemon.
        self.audit = HostAudit(config.state_dir,
                               HostAuditConfig.from_table(config.extra.get("audit", {})))
        self.service = HostService(config.state_dir, runner=runner,
                                   network_namespace=config.network_namespace)
        # VMMs' security events (seccomp kills, NEEDS_RESET) into the audit log; read on
        # every state change of a VM too, before the change itself is recorded.
        self.vm_events = VmEventWatcher(self.audit.log, self._vm_channels)
        self.add_lifecycle_observer(self._read_vm_events)
        self.add_lifecycle_observer(self.audit.record_transition)
        # Measured launch now, the launch gate before every VM launch (docs/SECURITY.md).
        self.integrity: HostIntegrity | None = None
        self._released = False
        try:
            self.integrity = open_integrity(config.extra.get("integrity"), config.state_dir,
                                            self.audit.log, self.service.lifecycle)
            if self.integrity is not None and self.integrity.gate is not None:
                # With a TPM, the disks' master key is sealed to it (issue #9).
                self.service.disks.keys.use_source(sealed_master_key(
                    self.integrity.gate.tpm.address,
                    config.state_dir / MASTER_KEY_FILE.rsplit("/", 1)[0]))
            self.reconciled = self.service.open()
            self.admin = (ensure_admin(self.ca, self.service, config, config.bootstrap_admin)
                          if config.bootstrap_admin else None)
            revocations = self.tls.revocation_list()
            self.api: Api = create_app(self.service, revocations)
            self.add_request_observer(self.audit.record_request)
            # Refuse (503) before the route runs once the log cannot record (fail closed).
            self.api.add_request_guard(self.audit.before_request)
            host, port = config.host_port
            self.server = ApiServer(
                self.api, self.tls, revocations, host=host, port=port,
                on_security_event=self.audit.security_hook(on_security_event))
        except BaseException:
            self._release()  # the swtpm it started, the state, the audit log
            raise
        self._stop = threading.Event()
        self._crl_thread: threading.Thread | None = None

    # The two hook points for the audit log (see docs/API.md).
    def add_request_observer(self, observer: RequestObserver) -> None:
        self.api.add_request_observer(observer)

    def add_lifecycle_observer(self, observer: LifecycleObserver) -> None:
        self.service.lifecycle.observers.append(observer)

    def _vm_channels(self) -> list[VmChannel]:
        channels = []
        for vm in self.service.vms.active():
            if vm.handle is not None:
                run_dir = Path(VmHandle.from_json(vm.handle).run_dir)
                channels.append(VmChannel(vm.id, vm.tenant, vm.name, run_dir / SECURITY_EVENTS))
        return channels

    def _read_vm_events(self, event: LifecycleEvent) -> None:
        try:
            vm = self.service.vms.by_id(event.vm_id) if event.state is not None else None
            if vm is None or vm.handle is None:
                return
            run_dir = Path(VmHandle.from_json(vm.handle).run_dir)
            self.vm_events.drain(VmChannel(vm.id, vm.tenant, vm.name,
                                           run_dir / SECURITY_EVENTS),
                                 final=event.state is VmState.STOPPED)
        except Exception:  # the transition itself must go on
            log.exception("reading the security events of VM %s failed", event.vm_id)

    @property
    def endpoint(self) -> str:
        host, _ = self.config.host_port
        name = "localhost" if host in ("127.0.0.1", "::1", "localhost") else host
        return f"https://{name}:{self.server.port}"

    @property
    def gate_line(self) -> str:
        """The launch gate's state at start, in one line (UNGATED when it is off)."""
        return self.integrity.summary() if self.integrity is not None else UNGATED

    def start(self) -> None:
        try:
            self.server.start()
        except BaseException:
            self.server.stop()
            self._release()
            raise
        self.vm_events.start()
        self._crl_thread = threading.Thread(target=self._refresh_crl, name="crl-refresh",
                                            daemon=True)
        self._crl_thread.start()

    def _refresh_crl(self) -> None:
        while not self._stop.wait(CRL_REFRESH_SECONDS):
            try:
                self.ca.refresh_crl()
            except (OSError, PkiError):
                log.exception("cannot re-sign the CRL")

    def stop(self) -> None:
        self._stop.set()
        self.server.stop()
        self.vm_events.stop()
        self._release()

    def _release(self) -> None:
        """Close what start-up opened, each step on its own (stop, or a failed start);
        once."""
        if self._released:
            return
        self._released = True
        for close in (self.service.close,
                      self.integrity.close if self.integrity is not None else None,
                      self.audit.close):
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing %s failed", close)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="isovisord", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        config = DaemonConfig.load(args.config, state_dir=args.state_dir, ca_dir=args.ca_dir,
                                   listen=args.listen, bootstrap_admin=args.bootstrap_admin,
                                   network_namespace=args.network_namespace)
        daemon = Daemon(config)
    except (ConfigError, PkiError, OSError, AuditError, IntegrityError, TpmError) as exc:
        print(f"isovisord: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.start()
    except (RuntimeError, OSError) as exc:  # start() released the swtpm and the state
        print(f"isovisord: {exc}", file=sys.stderr)
        return 1
    print(f"isovisord: listening on {daemon.endpoint} (mutual TLS 1.3); state in "
          f"{config.state_dir}; {len(daemon.reconciled)} VM(s) reconciled", flush=True)
    print(f"isovisord: {daemon.gate_line}", flush=True)
    if daemon.admin is not None:
        print(f"isovisord: Host Admin {daemon.admin.name!r}: cert {daemon.admin.cert}, "
              f"key {daemon.admin.key}, CA {daemon.ca.cert_path}", flush=True)
    stop.wait()
    daemon.stop()
    print("isovisord: stopped (VMs keep running)", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="isovisord: %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
