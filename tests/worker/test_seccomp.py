"""seccomp, checked from outside (in the spirit of Firecracker's test_seccomp.py): each
forbidden action kills the worker, and the host reports a security event naming the
syscall. Plus the filters themselves, loaded in a throwaway child."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from isovisor.worker.launcher import Launcher, LaunchRequest
from isovisor.worker.seccomp import policy
from isovisor.worker.seccomp.compile import compile_bpf
from isovisor.worker.seccomp.install import install
from isovisor.worker.security_report import explain_sigsys
from tests.worker.conftest import Vms

FORBIDDEN = {
    "execve": "execve",
    "ptrace": "ptrace",
    "socket-inet": "socket",
    "open-shadow": "openat",
}


def _killed_by_seccomp(vms: Vms, hook: str) -> tuple[str, str]:
    """The kill is certain; its audit record is printed rate-limited (printk_ratelimit,
    shared with every kernel message on the host), so one retry if it was dropped."""
    name, detail = _killed_once(vms, hook)
    if name == "?":
        name, detail = _killed_once(vms, hook)
    return name, detail


def _killed_once(vms: Vms, hook: str) -> tuple[str, str]:
    h = vms.launcher.launch(vms.request(test_hook=hook))
    vms.handles.append(h)
    result = h.wait(30)
    assert result is not None, f"{hook}: the worker survived"
    assert os.WIFSIGNALED(result.status) and os.WTERMSIG(result.status) == signal.SIGSYS, (
        hook, result.describe())
    assert result.seccomp is not None
    ev = h.security_event
    assert ev is not None and ev.kind == "seccomp-kill"
    return result.seccomp.name, ev.detail


@pytest.mark.kvm
@pytest.mark.parametrize("hook", sorted(FORBIDDEN))
def test_forbidden_action_kills_the_worker_and_is_reported(vms: Vms, hook: str) -> None:
    name, detail = _killed_by_seccomp(vms, hook)
    assert name == FORBIDDEN[hook]
    assert f"forbidden syscall {FORBIDDEN[hook]} (" in detail


@pytest.mark.kvm
def test_reading_another_vms_memory_through_proc_is_denied(vms: Vms) -> None:
    victim = vms.launch()
    name, detail = _killed_by_seccomp(vms, f"read-vm-memory:{victim.pid}")
    assert name == "openat", detail
    assert victim.ping() is not None  # the target VM runs on, untouched


@pytest.mark.kvm
def test_test_hook_is_inert_without_the_test_setting(launcher: Launcher,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     idle_elf: object) -> None:
    from isovisor.worker.errors import WorkerError

    monkeypatch.delenv("ISOVISOR_ENABLE_TEST_HOOKS")
    with pytest.raises(WorkerError, match="test hooks are disabled"):
        launcher.launch(LaunchRequest(kernel=idle_elf, test_hook="execve"))  # type: ignore


def _in_child_with(prog: bytes, action: str) -> int:
    """Fork; the child installs `prog` (no_new_privs first) and does `action`."""
    pid = os.fork()
    if pid == 0:
        try:
            import ctypes

            ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
            install(prog)
            if action == "getppid":
                os.getppid()
            elif action == "unix-socket":
                import socket

                socket.socket(socket.AF_UNIX).close()
            elif action == "write":
                os.write(2, b"")
            os._exit(0)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return status


def test_base_filter_kills_what_it_does_not_list_and_the_kill_is_named() -> None:
    prog = compile_bpf(policy.base())
    status = _in_child_with(prog, "getppid")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_base_filter_allows_what_it_lists() -> None:
    prog = compile_bpf(policy.base())
    for action in ("write", "unix-socket"):
        status = _in_child_with(prog, action)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, action


def test_seccomp_kill_names_the_syscall_from_the_audit_record() -> None:
    pid = os.fork()
    if pid == 0:
        try:
            import ctypes

            ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
            install(compile_bpf(policy.control()))
            os.getppid()
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    kill = explain_sigsys(pid, status)
    assert kill is not None
    if kill.syscall is None:
        pytest.skip(f"LOUD SKIP: no seccomp audit record on this host: {kill.source}")
    assert kill.name == "getppid"


def _rules(p: policy.Policy) -> dict[str, list[policy.Rule]]:
    out: dict[str, list[policy.Rule]] = {}
    for r in p.rules:
        out.setdefault(r.syscall, []).append(r)
    return out


NEVER = ("execve", "execveat", "ptrace", "open", "openat", "openat2", "creat", "mount",
         "umount2", "pivot_root", "chroot", "bpf", "keyctl", "add_key", "request_key",
         "process_vm_readv", "process_vm_writev", "unshare", "setns", "io_uring_setup",
         "userfaultfd", "perf_event_open", "kexec_load", "init_module", "finit_module",
         "setuid", "setgid", "capset", "prctl", "fork", "vfork", "kill", "connect", "bind")


@pytest.mark.parametrize("make", list(policy.POLICIES.values()))
def test_no_policy_allows_a_forbidden_syscall(make: object) -> None:
    p = make()  # type: ignore[operator]
    rules = _rules(p)
    assert not set(NEVER) & set(rules), p.name
    for r in rules.get("socket", []):
        assert r.conditions == ((0, 0xFFFF_FFFF, policy.AF_UNIX),)
    for r in rules.get("clone", []):
        assert r.conditions == ((0, policy.CLONE_THREAD, policy.CLONE_THREAD),)
    for r in rules.get("ioctl", []):
        assert len(r.conditions) == 1 and r.conditions[0][:2] == (1, 0xFFFF_FFFF)
    compile_bpf(p)


def test_ioctls_are_restricted_per_role() -> None:
    from isovisor.kvm import constants as k

    def ioctls(p: policy.Policy) -> set[int]:
        return {r.conditions[0][2] for r in p.rules if r.syscall == "ioctl"}

    assert k.KVM_RUN in ioctls(policy.vcpu())
    assert k.KVM_RUN not in ioctls(policy.device_io())
    # the control thread also tears the VM down: a TAP's offloads go back to none
    assert ioctls(policy.control()) == set(policy.FD_IOCTLS) | set(policy.TAP_IOCTLS)
    for never in (k.KVM_CREATE_VM, k.KVM_CREATE_VCPU, k.KVM_SET_USER_MEMORY_REGION,
                  k.KVM_IOEVENTFD, k.KVM_IRQFD, k.KVM_SET_CPUID2, k.KVM_SET_MSRS):
        assert never not in ioctls(policy.base()), hex(never)
    assert policy.role_for_thread("vcpu0") == "vcpu"
    assert policy.role_for_thread("io-virtio-rng@0xd0000000") == "device-io"
    assert policy.role_for_thread("serial-input") == "device-io"


def test_a_device_thread_started_by_a_vcpu_thread_can_do_its_io() -> None:
    """The role filters stack as they do in a worker: base, then vcpu on the vCPU thread,
    then device-io on the device thread it starts (DRIVER_OK comes from a vCPU)."""
    import select
    import tempfile
    import threading

    from isovisor.worker.seccomp import threads

    programs = {name: compile_bpf(make()) for name, make in policy.POLICIES.items()}
    with tempfile.TemporaryFile() as disk:
        disk.write(b"x" * 4096)
        disk.flush()
        pid = os.fork()
        if pid == 0:
            try:
                import ctypes

                ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
                install(programs["base"], all_threads=True)
                threads.install_role_hook(programs)
                ok: list[bool] = []

                def device_io() -> None:
                    ep = select.epoll()
                    efd = os.eventfd(0, os.EFD_NONBLOCK)
                    ep.register(efd, select.EPOLLIN)
                    os.eventfd_write(efd, 1)
                    assert ep.poll(1)
                    assert os.eventfd_read(efd) == 1
                    assert os.pread(disk.fileno(), 4, 0) == b"xxxx"
                    os.pwrite(disk.fileno(), b"y", 0)
                    os.fdatasync(disk.fileno())
                    os.close(efd)
                    ep.close()
                    ok.append(True)

                def vcpu() -> None:
                    t = threading.Thread(target=device_io, name="io-test")
                    t.start()
                    t.join()

                v = threading.Thread(target=vcpu, name="vcpu0")
                v.start()
                v.join()
                os._exit(0 if ok else 2)
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, describe(status)


def describe(status: int) -> str:
    from isovisor.worker.security_report import describe_status

    return describe_status(status)


def test_a_sleep_interrupted_by_stop_and_continue_resumes_under_the_filters() -> None:
    """SIGSTOP/SIGCONT during a sleep resumes it through restart_syscall."""
    import time

    prog = compile_bpf(policy.base())
    control = compile_bpf(policy.control())
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            import ctypes

            os.close(r)
            ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
            install(prog)
            install(control)
            os.write(w, b".")
            # a relative nanosleep resumes through restart_syscall (an absolute
            # clock_nanosleep, like time.sleep's, would simply be reissued)
            ts = (ctypes.c_long * 2)(1, 0)
            ctypes.CDLL(None).nanosleep(ts, None)
            os._exit(0)
        finally:
            os._exit(1)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    time.sleep(0.2)
    os.kill(pid, signal.SIGSTOP)
    time.sleep(0.2)
    os.kill(pid, signal.SIGCONT)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, describe(status)



def _device_thread_in_child(action: Callable[[], None], extra_fd: int | None = None,
                            while_running: Callable[[], None] | None = None) -> int:
    """Fork; the child stacks the filters as a worker does (base, vcpu0's, then a device
    thread's started by it) and runs `action()` on the device thread. `extra_fd` lands at
    the vsock broker socket's fixed number first; the parent runs `while_running()` after
    the fork. Returns the wait status."""
    from isovisor.worker.config import FD_VSOCK_BROKER
    from isovisor.worker.seccomp import threads

    programs = {name: compile_bpf(make()) for name, make in policy.POLICIES.items()}
    pid = os.fork()
    if pid == 0:
        try:
            import ctypes
            import threading

            if extra_fd is not None:
                os.dup2(extra_fd, FD_VSOCK_BROKER)
            ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)
            install(programs["base"], all_threads=True)
            threads.install_role_hook(programs)
            ok: list[bool] = []

            def device_io() -> None:
                action()
                ok.append(True)

            def vcpu() -> None:
                t = threading.Thread(target=device_io, name="io-virtio-vsock@0xd0000000")
                t.start()
                t.join()

            v = threading.Thread(target=vcpu, name="vcpu0")
            v.start()
            v.join()
            os._exit(0 if ok else 2)
        finally:
            os._exit(1)
    if while_running is not None:
        while_running()
    _, status = os.waitpid(pid, 0)
    return status


def test_a_vsock_device_thread_can_do_its_io_under_the_filters(tmp_path: Path) -> None:
    """What the jailed vsock device does: accept host clients on the listening socket the
    host side bound, get sockets the host side's broker connected (recvmsg on the broker
    socket, wrapped in socket objects), and move bytes and shutdowns on both."""
    import socket

    from isovisor.worker import protocol
    from isovisor.worker.config import FD_VSOCK_BROKER
    from isovisor.worker.vsock_broker import BrokerConnector, VsockBroker

    uds = tmp_path / "v.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as service, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        listener.bind(str(uds))
        listener.listen(4)
        listener.setblocking(False)
        service.bind(f"{uds}_5000")
        service.listen(4)
        client.connect(str(uds))  # waits in the backlog for the device's accept
        client.sendall(b"CONNECT 5\n")
        host_end, worker_end = protocol.socketpair()
        broker = VsockBroker(host_end, uds)

        def vsock_io() -> None:
            conn, _ = listener.accept()  # accept4, and CPython's getsockname
            conn.setblocking(False)
            line = conn.recv(32, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            assert conn.recv(len(line), socket.MSG_DONTWAIT) == b"CONNECT 5\n"
            conn.send(b"OK 1073741824\n", socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            conn.shutdown(socket.SHUT_WR)
            conn.close()
            connector = BrokerConnector(socket.socket(
                socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=FD_VSOCK_BROKER))
            sock = connector(5000)  # sendmsg/recvmsg on the broker socket
            assert sock is not None
            sock.send(b"ping", socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            connector.close()  # else a ResourceWarning's repr calls getpeername

        try:
            status = _device_thread_in_child(vsock_io, worker_end.fileno(), broker.start)
        finally:
            worker_end.close()
            broker.close()
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, describe(status)
        assert client.recv(64) == b"OK 1073741824\n"
        peer, _ = service.accept()
        with peer:
            assert peer.recv(16) == b"ping"
        assert broker.connected == 1


@pytest.mark.parametrize("action", ["connect", "sendmsg-elsewhere", "bind"])
def test_a_device_thread_cannot_connect_or_pass_fds_on_other_sockets(action: str) -> None:
    import socket

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # made before the filters

    def forbidden() -> None:
        if action == "connect":
            s.connect("/nonexistent")
        elif action == "sendmsg-elsewhere":  # any socket but the broker's
            a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                (0).to_bytes(4, "little"))])
        else:
            s.bind(b"\0isovisor-test")

    try:
        status = _device_thread_in_child(forbidden)
    finally:
        a.close()
        b.close()
        s.close()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS, describe(status)
