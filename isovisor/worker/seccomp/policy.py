"""What each part of a worker may do after setup: the syscall allowlists.

Filters stack: a syscall runs only if every filter on the thread allows it. The base
filter is installed by the main thread before any other thread exists, so it binds every
thread; each thread then adds its role's filter before it runs guest-facing code. A thread
inherits its creator's filters: device I/O threads are started on DRIVER_OK by a vCPU
thread, so the vCPU role also allows what starting and running a device thread needs
(thread creation, epoll, eventfds, block I/O); the device thread's own filter then narrows
that (in particular, it can issue no KVM ioctl but KVM_IRQ_LINE).

Everything not listed kills the whole worker (SECCOMP_RET_KILL_PROCESS), including:
open/openat/openat2/creat, execve/execveat, ptrace, process_vm_readv/writev, mount,
umount2, pivot_root, chroot, unshare, setns, bpf, keyctl/add_key/request_key, io_uring,
userfaultfd, perf_event_open, kexec, module loading, and sockets of any family but AF_UNIX.
"""

from __future__ import annotations

from dataclasses import dataclass

from isovisor.devices.tap import TUNSETOFFLOAD
from isovisor.kvm import constants as k
from isovisor.worker.config import FD_CONTROL, FD_VSOCK_BROKER

AF_UNIX = 1
CLONE_THREAD = 0x00010000
SECCOMP_SET_MODE_FILTER = 1
ENOSYS = 38
FALLOC_PUNCH = 0x1 | 0x2  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE (RAM scrub, discard)
FALLOC_ZERO = 0x1 | 0x10  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_ZERO_RANGE (blk WRITE_ZEROES)
F_GETFD, F_SETFD, F_GETFL, F_SETFL = 1, 2, 3, 4
# The worker is its PID namespace's init: its thread group id is 1 there, so tgkill may
# reach only its own threads (vCPU kicks).
OWN_TGID = 1

# Generic fd ioctls CPython itself issues: os.set_blocking (FIONBIO), os.set_inheritable
# (FIOCLEX / FIONCLEX). They change only flags of the caller's own fd.
FIONBIO, FIOCLEX, FIONCLEX = 0x5421, 0x5451, 0x5450
FD_IOCTLS = (FIONBIO, FIOCLEX, FIONCLEX)
# ioctl requests by role (compared on the low 32 bits, the kernel's `unsigned int cmd`).
VCPU_IOCTLS = (
    k.KVM_RUN, k.KVM_GET_REGS, k.KVM_SET_REGS, k.KVM_GET_SREGS, k.KVM_SET_SREGS,
    k.KVM_TRANSLATE, k.KVM_GET_VCPU_EVENTS, k.KVM_SET_VCPU_EVENTS, k.KVM_GET_MP_STATE,
    k.KVM_IRQ_LINE,
)
DEVICE_IOCTLS = (k.KVM_IRQ_LINE,)
# TAP requests used at run time: only TUNSETOFFLOAD (virtio-net mirrors the offloads the
# guest negotiated at DRIVER_OK). TUNSETIFF and TUNSETVNETHDRSZ happen before the jail.
TAP_IOCTLS: tuple[int, ...] = (TUNSETOFFLOAD,)

MEMORY = ("brk", "mmap", "munmap", "mremap", "mprotect", "madvise")
# restart_syscall: the kernel's way back into a sleep (nanosleep, futex, poll) that a
# signal interrupted, e.g. a vCPU kick; every thread can hit it.
THREADS = ("futex", "set_robust_list", "rseq", "sched_yield", "gettid", "getpid",
           "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "exit", "restart_syscall")
TIME = ("clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep", "gettimeofday")
IO = ("read", "write", "readv", "writev", "close")
BLOCK_IO = ("pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2", "fsync",
            "fdatasync", "lseek")
POLL = ("poll", "ppoll", "select", "pselect6", "epoll_create1", "epoll_ctl", "epoll_wait",
        "epoll_pwait", "epoll_pwait2", "eventfd2", "pipe2")
# Stream I/O on Unix sockets the worker was handed or accepted (send/recv are sendto/
# recvfrom). No call creates, binds or connects a socket: the host side does that.
UNIX_IO = ("recvfrom", "sendto", "shutdown")
# A vsock device's host sockets: clients accepted on the listening socket the host side
# bound, and sockets the host side's broker connected (received with recvmsg on the
# broker socket). CPython checks an fd it wraps in a socket object with getsockname.
VSOCK_IO = (*UNIX_IO, "accept4", "getsockname")


@dataclass(frozen=True)
class Rule:
    """Allow `syscall` when every (arg index, mask, value) condition holds; several
    rules for one syscall are alternatives."""

    syscall: str
    conditions: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class Policy:
    name: str
    rules: tuple[Rule, ...]
    # Syscalls answered with ENOSYS rather than a kill: clone3, whose flags live in
    # memory seccomp cannot read, so glibc falls back to clone(2), whose flags it can.
    enosys: tuple[str, ...] = ()


def _plain(*names: str) -> list[Rule]:
    return [Rule(n) for n in names]


def _ioctls(requests: tuple[int, ...]) -> list[Rule]:
    return [Rule("ioctl", ((1, 0xFFFF_FFFF, r & 0xFFFF_FFFF),)) for r in sorted(set(requests))]


_FALLOCATE = [Rule("fallocate", ((1, 0xFFFF_FFFF, m),)) for m in (FALLOC_PUNCH, FALLOC_ZERO)]
# Adding a filter only ever narrows what a thread may do; every role keeps it so a thread
# it starts (a device thread started by a vCPU thread) can install its own role filter.
_ADD_FILTER = Rule("seccomp", ((0, 0xFFFF_FFFF, SECCOMP_SET_MODE_FILTER),))
_TGKILL = Rule("tgkill", ((0, 0xFFFF_FFFF, OWN_TGID),))
_CLONE_THREAD = Rule("clone", ((0, CLONE_THREAD, CLONE_THREAD),))
_FCNTL = [Rule("fcntl", ((1, 0xFFFF_FFFF, cmd),)) for cmd in (F_GETFD, F_SETFD, F_GETFL,
                                                                 F_SETFL)]


def _messages_on(*fds: int) -> list[Rule]:
    """sendmsg/recvmsg, the calls that can carry file descriptors (SCM_RIGHTS), only on
    the given sockets, named by their fixed numbers (config.FD_*): no other socket (a vsock
    connection to a host service) can take a descriptor of the worker out."""
    return [Rule(name, ((0, 0xFFFF_FFFF, fd),)) for name in ("sendmsg", "recvmsg")
            for fd in fds]


def base() -> Policy:
    """The ceiling for the whole worker after setup (the union of the roles, plus the
    process-level calls: exit_group, seccomp to add a thread's role filter)."""
    rules = _plain(*MEMORY, *THREADS, *TIME, *IO, *BLOCK_IO, *POLL, *VSOCK_IO, "mincore",
                   "exit_group", "getrandom", "getuid", "geteuid", "getgid", "getegid",
                   "rt_sigaction")
    rules += [_TGKILL, _CLONE_THREAD, *_FCNTL,
              Rule("socket", ((0, 0xFFFF_FFFF, AF_UNIX),)), *_FALLOCATE,
              _ADD_FILTER, *_messages_on(FD_CONTROL, FD_VSOCK_BROKER)]
    rules += _ioctls(VCPU_IOCTLS + DEVICE_IOCTLS + TAP_IOCTLS + FD_IOCTLS)
    return Policy("base", tuple(rules), enosys=("clone3",))


def vcpu() -> Policy:
    # VSOCK_IO and the broker socket: a vsock device thread is started by a vCPU thread
    # (DRIVER_OK) and keeps this filter under its own.
    rules = _plain(*MEMORY, *THREADS, *TIME, *IO, *BLOCK_IO, *POLL, *VSOCK_IO, "getrandom")
    rules += [_TGKILL, _CLONE_THREAD, _ADD_FILTER, *_FCNTL, *_FALLOCATE,
              *_messages_on(FD_VSOCK_BROKER), *_ioctls(VCPU_IOCTLS + TAP_IOCTLS + FD_IOCTLS)]
    return Policy("vcpu", tuple(rules), enosys=("clone3",))


def device_io() -> Policy:
    rules = _plain(*MEMORY, *THREADS, *TIME, *IO, *BLOCK_IO, *POLL, *VSOCK_IO, "getrandom")
    rules += [_TGKILL, _ADD_FILTER, *_FCNTL, *_FALLOCATE, *_messages_on(FD_VSOCK_BROKER),
              *_ioctls(DEVICE_IOCTLS + TAP_IOCTLS + FD_IOCTLS)]
    return Policy("device-io", tuple(rules))


def control() -> Policy:
    # The VM's teardown runs here too (Machine.close): device resets take the vsock
    # device's host sockets out of its epoll set and set a TAP's offloads back to none.
    rules = _plain(*MEMORY, *THREADS, *TIME, *IO, "poll", "ppoll", "select", "pselect6",
                   "pipe2", *UNIX_IO, "mincore", "exit_group", "rt_sigaction", "epoll_ctl")
    rules += [_TGKILL, *_FCNTL, Rule("fallocate", ((1, 0xFFFF_FFFF, FALLOC_PUNCH),)),
              *_messages_on(FD_CONTROL), *_ioctls(TAP_IOCTLS + FD_IOCTLS)]
    return Policy("control", tuple(rules))


ROLES = ("vcpu", "device-io", "control")
POLICIES = {"base": base, "vcpu": vcpu, "device-io": device_io, "control": control}


def role_for_thread(name: str) -> str:
    """vCPU threads are named vcpuN (vmm.vcpu); everything else but the main thread is
    device I/O (io-<device>, serial-input...), the role without KVM_RUN."""
    return "vcpu" if name.startswith("vcpu") else "device-io"
