"""The bounds checks whose teeth CI tests: each mutant weakens one check (a source snippet
replaced inside one function, in a throwaway process; the files are never touched) and
names the fuzzers and tests of which at least one must then fail."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str
    function: str  # "func" or "Class.method"
    before: str  # must occur exactly once in the function's source
    after: str
    fuzzers: tuple[str, ...]  # fuzz/harnesses/<name>.py, replayed on corpus + mutations
    tests: tuple[str, ...]  # pytest node ids


MUTANTS = (
    Mutant("guest-memory-end-check", "isovisor.memory.guest_memory", "GuestMemory.check_range",
           "if end > r.end:", "if end > r.end + 4096:",
           ("virtqueue",),
           ("tests/memory/test_guest_memory.py::test_out_of_range_is_refused",)),
    Mutant("descriptor-chain-hop-budget", "isovisor.devices.virtio.chain",
           "walk_chain", "if budget == 0:", "if budget == 0 and False:",
           ("virtqueue",),
           ("tests/devices/virtio/test_chain.py::test_self_loop",)),
    Mutant("queue-size-power-of-two", "isovisor.devices.virtio.queue", "check_layout",
           "if n == 0 or n > cfg.max_size or n & (n - 1):", "if n == 0 or n > cfg.max_size:",
           ("virtqueue",),
           ("tests/devices/virtio/test_queue.py::test_size_must_be_power_of_two_within_max",)),
    Mutant("blk-sector-bounds", "isovisor.devices.virtio.blk_request", "_check_range",
           "if end > capacity * SECTOR_SIZE:", "if end > (capacity + 8) * SECTOR_SIZE:",
           ("virtio_blk",),
           ("tests/devices/virtio/test_blk.py::test_out_of_range_sectors",)),
    Mutant("boot-phdr-table-bounds", "isovisor.vmm.boot.elf", "parse_elf",
           "if table_end > size:", "if table_end > size + 4096:",
           ("boot_loader",),
           ("tests/vmm/test_boot_elf.py::test_phdr_past_eof_names_the_header_and_numbers",)),
    Mutant("uart-rx-limit", "isovisor.devices.legacy.uart", "Uart16550.feed",
           "room = self._rx_limit - len(self._host_rx)",
           "room = 2 * self._rx_limit - len(self._host_rx)",
           ("uart",),
           ("tests/devices/test_uart.py::test_host_queue_bound_drops_counts_and_reports_overrun",)),
    Mutant("vsock-payload-length", "isovisor.devices.virtio.vsock.packet", "parse_tx_header",
           "if length > available:", "if length > available + 64:",
           ("virtio_vsock",),
           ("tests/devices/virtio/test_vsock_packet.py::test_hostile_headers",)),
    Mutant("net-frame-length", "isovisor.devices.virtio.net_header", "check_tx",
           "if not ETH_HLEN <= frame_len <= MAX_FRAME:", "if not 0 <= frame_len <= MAX_FRAME:",
           ("virtio_net",),
           ("tests/devices/virtio/test_net_header.py::test_frame_length_bounds",)),
    Mutant("virtio-config-read-bounds", "isovisor.devices.virtio.device",
           "VirtioDevice.read_config", "offset + size > len(data)", "offset > len(data)",
           ("virtio_mmio",),
           ("tests/devices/virtio/test_mmio.py::test_config_space_bounds",)),
    Mutant("nic-anti-spoof-ip", "isovisor.host.network.ruleset", "nic_ruleset",
           'f"    ether type ip ip saddr {ip} accept\\n"', '"    ether type ip accept\\n"',
           ("tenant_networks",),
           ("tests/network/test_plumbing.py::test_a_nic_sends_only_from_its_own_addresses_and_"
            "only_inside_its_network",)),
)

# Controls: changes that weaken nothing. They must survive, or the machinery would be
# reporting kills it did not see.
CONTROLS = (
    Mutant("control-equivalent-end-check", "isovisor.memory.guest_memory",
           "GuestMemory.check_range", "if end > r.end:", "if end > r.end + 0:",
           ("virtqueue",),
           ("tests/memory/test_guest_memory.py::test_out_of_range_is_refused",)),
)

BY_NAME = {m.name: m for m in (*MUTANTS, *CONTROLS)}
