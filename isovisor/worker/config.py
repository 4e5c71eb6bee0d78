"""The launch configuration the host sends (through the zygote) to a worker.

Only values and fd slots: the worker opens nothing by path but /proc/self/fd/N magic
links to fds it was handed, and only before its jail. Checked on receipt like any other
input: a malformed config refuses the launch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from isovisor.worker.errors import ProtocolError

# Where each fd lands in the worker (dup2 targets), so nothing depends on the numbers the
# host or the zygote happened to use.
FD_SERIAL_IN = 0
FD_SERIAL_OUT = 1
FD_STDERR = 2
FD_CONTROL = 3
FD_KVM = 4
FD_KERNEL = 5
FD_INITRD = 6
FD_FIRST_FREE = 7
BASE_SLOTS = ("serial_in", "serial_out", "stderr", "control", "kvm", "kernel", "initrd")
# Device backends the host side opened, above the W0 -> zygote report pipe (fd 7). Fixed
# numbers too: the seccomp filters name the vsock broker socket by its number.
MAX_DISKS = MAX_NETS = 8  # virtio-mmio slots per VM (isovisor.devices.virtio.slots)
FD_VSOCK_LISTENER = 8  # the listening Unix socket at <uds>, bound by the host side
FD_VSOCK_BROKER = 9  # SEQPACKET to the host side, which connects <uds>_P for the worker
FD_DISK_BASE = 10  # disk i: the image, opened by the host side as its spec says
FD_TAP_BASE = FD_DISK_BASE + MAX_DISKS  # net i: the TAP, attached by the host side
DEVICE_SLOTS = ("vsock_listener", "vsock_broker", *(f"disk{i}" for i in range(MAX_DISKS)),
                *(f"tap{i}" for i in range(MAX_NETS)))
FD_SLOTS = BASE_SLOTS + DEVICE_SLOTS
FD_TARGET = {
    **dict(zip(BASE_SLOTS, range(FD_FIRST_FREE), strict=True)),
    "vsock_listener": FD_VSOCK_LISTENER, "vsock_broker": FD_VSOCK_BROKER,
    **{f"disk{i}": FD_DISK_BASE + i for i in range(MAX_DISKS)},
    **{f"tap{i}": FD_TAP_BASE + i for i in range(MAX_NETS)},
}


@dataclass
class WorkerConfig:
    vm_id: str
    uid: int
    gid: int
    memory: int
    vcpus: int
    cmdline: str = ""
    protocol: str = "auto"
    serial_rate: float | None = 1024 * 1024
    serial_total_limit: int | None = 1024 * 1024 * 1024
    cgroup_procs: list[str] = field(default_factory=list)
    tasks_limit: int = 64
    binds: dict[str, str] = field(default_factory=dict)
    # fd slot name -> index in the message's fd list (absent slot: not provided)
    fd_index: dict[str, int] = field(default_factory=dict)
    test_hook: str | None = None
    rng: bool = False  # a virtio-rng device (entropy from getrandom(2): no fd needed)
    log_level: int = 30
    # virtio-blk, virtio-net, virtio-vsock: how each device behaves (isovisor.worker.
    # devices encodes and checks them); their backends arrive as fds (disk<i>, tap<i>,
    # vsock_listener + vsock_broker)
    disks: list[dict[str, Any]] = field(default_factory=list)
    nets: list[dict[str, Any]] = field(default_factory=list)
    vsock: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(doc: Any) -> WorkerConfig:
        if not isinstance(doc, dict):
            raise ProtocolError("worker config is not an object")
        try:
            cfg = WorkerConfig(**doc)
        except TypeError as exc:
            raise ProtocolError(f"worker config: {exc}") from None
        ints = (cfg.uid, cfg.gid, cfg.memory, cfg.vcpus, cfg.tasks_limit, cfg.log_level)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
            raise ProtocolError("worker config: ids, sizes and limits must be integers >= 0")
        if cfg.uid == 0 or cfg.gid == 0:
            raise ProtocolError("worker config: a worker never runs as uid or gid 0")
        if not isinstance(cfg.fd_index, dict) or any(
            k not in FD_SLOTS or not isinstance(v, int) for k, v in cfg.fd_index.items()
        ):
            raise ProtocolError("worker config: bad fd_index")
        for slot in ("control", "kvm", "kernel"):
            if slot not in cfg.fd_index:
                raise ProtocolError(f"worker config: no {slot} fd")
        from isovisor.worker.devices import check_devices  # it imports this module

        check_devices(cfg)
        return cfg
