"""Inventory entries of the host side: the API listener, the files and directories the
daemon creates (found by constructing a real daemon in a scratch state directory, and a
real VM run directory from the real runner with a no-op VMM command), the vsock host
sockets, and the worker's control protocol and test-only hook."""

from __future__ import annotations

import contextlib
import os
import re
import ssl
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from isovisor.security.surface.astscan import preceding_comments, qualname
from isovisor.security.surface.machine import SurfaceMachine
from isovisor.security.surface.model import (
    CLIENT_API,
    HOST_TPM,
    TENANT_TENANT,
    VMM_HOST,
    Entry,
    SurfaceError,
    details,
    hexa,
)

# The umask the inventory's modes assume (files created without an explicit mode follow it).
GENERATION_UMASK = 0o022
ADMIN = "surfaceadmin"
VM_ID = "surfacevm"
RUN_WAIT = 10.0


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _mode(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


_SEQ = re.compile(r"\d{6,}")


def _normalise(rel: str) -> str:
    return _SEQ.sub("{seq}", rel.replace(ADMIN, "{principal}").replace(VM_ID, "{vm}"))


def _describe(path: Path, root: Path) -> dict[str, str]:
    st = path.lstat()
    return {"path": _normalise(str(path.relative_to(root))), "type": _kind(st.st_mode),
            "mode": _mode(st.st_mode)}


def _tree(top: Path, root: Path) -> list[dict[str, str]]:
    items = [_describe(p, root) for p in top.rglob("*") if not p.name.endswith(".tmp")]
    unique = {(i["path"], i["type"], i["mode"]): i for i in items}
    return [unique[k] for k in sorted(unique)]


def _group_key(name: str, names: list[str]) -> str:
    """isovisord.sqlite3-wal belongs with isovisord.sqlite3."""
    owners = [n for n in names if n != name and name.startswith(n)]
    return max(owners, key=len) if owners else name


def _run_vm_dir(state: Path) -> None:
    """A real run directory: the real runner and monitor with a VMM that exits at once."""
    from isovisor.host.monitor import EXIT_FILE
    from isovisor.host.runner import Launch, SubprocessRunner

    runner = SubprocessRunner(state / "run", command=lambda _launch, _console: [
        sys.executable, "-c", "pass"])
    handle = runner.start(Launch(vm_id=VM_ID, kernel=state / "kernel", vcpus=1, memory_mib=16))
    deadline = time.monotonic() + RUN_WAIT
    while not (Path(handle.run_dir) / EXIT_FILE).exists():
        if time.monotonic() > deadline:
            raise SurfaceError("the VM monitor did not finish a no-op VMM in time")
        time.sleep(0.01)


def daemon_entries() -> list[Entry]:
    from isovisor.api.tls import server_context
    from isovisor.host.config import DEFAULT_LISTEN, DaemonConfig
    from isovisor.host.daemon import Daemon

    with tempfile.TemporaryDirectory(prefix="isovisor-surface-") as tmp, \
            _umask(GENERATION_UMASK):
        root = Path(tmp)
        state = root / "state"
        config = DaemonConfig(state_dir=state, bootstrap_admin=ADMIN, listen="127.0.0.1:0")
        daemon = Daemon(config)
        try:
            ctx = server_context(daemon.tls.ca_cert, daemon.tls.crl, daemon.tls.cert,
                                 daemon.tls.key)
            _run_vm_dir(state)
            listener = Entry(
                id="host:api-listener", boundary=CLIENT_API, source=qualname(Daemon),
                details=details(
                    default_listen=DEFAULT_LISTEN, transport="tcp",
                    tls_minimum=ctx.minimum_version.name,
                    client_certificate="required" if ctx.verify_mode == ssl.CERT_REQUIRED
                    else ctx.verify_mode.name,
                    plaintext_listeners=0,
                ),
            )
            names = sorted(p.name for p in state.iterdir())
            groups: dict[str, list[dict[str, str]]] = {}
            for p in sorted(state.iterdir()):
                key = _group_key(p.name, names)
                items = groups.setdefault(key, [])
                items.append(_describe(p, state))
                if p.is_dir():
                    items.extend(_tree(p, state))
            state_mode = _mode(state.stat().st_mode)
        finally:
            daemon.service.close()
            daemon.audit.close()
    out = [listener]
    for key, items in groups.items():
        out.append(Entry(
            id=f"host:state/{_normalise(key)}", boundary=VMM_HOST, source=qualname(Daemon),
            details=details(state_dir_mode=state_mode, umask=_mode(GENERATION_UMASK),
                            items=items),
        ))
    return out


def vsock_entries(machine: SurfaceMachine) -> list[Entry]:
    """The host-side sockets of each vsock device in the surface machine."""
    from isovisor.devices.virtio.vsock.device import VirtioVsock

    out = []
    for t in machine.machine.virtio:
        dev = t.device
        if not isinstance(dev, VirtioVsock) or dev.uds is None:
            continue
        st = os.stat(dev.uds)
        out.append(Entry(
            id="host:vsock-uds", boundary=TENANT_TENANT, source=qualname(type(dev.listener)),
            details=details(listen="<uds>", listen_type=_kind(st.st_mode),
                            listen_mode=_mode(st.st_mode),
                            guest_connects_to="<uds>_<port>",
                            handshake="CONNECT <port>\\n -> OK <port>\\n"),
        ))
        break
    return out


def worker_entries() -> list[Entry]:
    from isovisor.worker import protocol, test_hook

    comments = preceding_comments(protocol.__name__)
    ops: dict[str, list[str]] = {}
    for name, value in sorted(vars(protocol).items()):
        if name.startswith("OP_") and isinstance(value, str):
            ops.setdefault(comments.get(name, "?"), []).append(value)
    return [
        Entry(
            id="worker:control-protocol", boundary=VMM_HOST, source=qualname(protocol.decode),
            details=details(transport="AF_UNIX SOCK_SEQPACKET socketpair, JSON + SCM_RIGHTS",
                            max_message_bytes=protocol.MAX_MESSAGE_BYTES,
                            max_fds=protocol.MAX_FDS,
                            ops={k: sorted(v) for k, v in sorted(ops.items())}),
        ),
        Entry(
            id="worker:test-hook", boundary=VMM_HOST, source=qualname(test_hook.run_forbidden),
            details=details(enabled_by=test_hook.ENABLE_ENV,
                            actions=sorted({"probe", *test_hook.FORBIDDEN_ACTIONS}),
                            reachable_from="launch request (host side), never the guest"),
        ),
    ]


def _path_hints(module: str, function: str) -> list[str]:
    """The string constants a path-choosing function is built from."""
    import ast

    from isovisor.security.surface.astscan import module_tree

    for node in ast.walk(module_tree(module)):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            return sorted({c.value for stmt in body for c in ast.walk(stmt)
                           if isinstance(c, ast.Constant) and isinstance(c.value, str)})
    return []


def runtime_entries() -> list[Entry]:
    """Host files the VMM side reads back that other local processes might write."""
    from isovisor.host import integrity as hi
    from isovisor.host import runner
    from isovisor.security.audit import event_channel as ec
    from isovisor.security.audit import vm_events
    from isovisor.security.integrity import attestation, eventlog, signing
    from isovisor.security.integrity.gate import LaunchGate
    from isovisor.security.tpm import swtpm
    from isovisor.vmm import emulator_probe as ep
    from isovisor.worker import ids

    return [
        Entry(
            id="host:runtime/emulator-probe-cache", boundary=VMM_HOST,
            source=qualname(ep.cached_probe),
            details=details(file=ep.CACHE_NAME, max_bytes=ep._MAX_CACHE_BYTES,
                            directory_hints=_path_hints(ep.__name__, "default_cache_path"),
                            parser=qualname(ep._from_json)),
        ),
        Entry(
            id="host:runtime/worker-id-leases", boundary=VMM_HOST,
            source=qualname(ids.IdAllocator),
            details=details(directory=str(ids.DEFAULT_LEASE_DIR),
                            id_range=[hexa(ids.ID_RANGE_START), ids.ID_RANGE_SIZE]),
        ),
        Entry(
            id="host:runtime/vmm-security-events", boundary=VMM_HOST,
            source=qualname(ec.ChannelReader),
            details=details(file=f"RUN_DIR/{runner.SECURITY_EVENTS}",
                            writer="isovisor run --security-events (host side of the worker)",
                            reader=qualname(vm_events.VmEventWatcher),
                            parser=qualname(ec.parse_event_line),
                            max_line_bytes=ec.MAX_LINE_BYTES, read_chunk=ec.READ_CHUNK,
                            max_channel_bytes=ec.MAX_CHANNEL_BYTES,
                            writer_max_bytes=ec.WRITER_MAX_BYTES),
        ),
        Entry(
            id="host:runtime/integrity-state", boundary=HOST_TPM,
            source=qualname(LaunchGate),
            details=details(
                directory=f"STATE/{hi.INTEGRITY_DIR}",
                event_log=hi.EVENT_LOG, event_log_parser=qualname(eventlog.EventLog.from_json),
                event_log_max_bytes=eventlog.MAX_LOG_BYTES,
                tpm_address_file=hi.TPM_FILE, swtpm_socket=f"swtpm/{swtpm.SOCKET_NAME}",
                signed_documents=qualname(signing.read_signed),
                signed_max_bytes=signing.MAX_DOCUMENT_BYTES,
                quote_bundle_parser=qualname(attestation.verify_bundle),
                quote_bundle_max_bytes=attestation.MAX_BUNDLE_BYTES),
        ),
    ]


def host_entries(machine: SurfaceMachine) -> list[Entry]:
    return [*daemon_entries(), *vsock_entries(machine), *worker_entries(),
            *runtime_entries()]


