"""virtio-rng, the entropy device (virtio 1.2 §5.4): one queue of device-writable buffers
that the device fills from the host's getrandom(2).

§5.4.6.1: the driver places only device-writable buffers in the queue; a chain with
device-readable parts is a bad request (completed with 0 bytes). §5.4.6.2: the device
places one or more bytes and may use less than the whole buffer, so each request is
capped at `max_request` bytes (64 KiB by default): a guest posting a huge buffer costs
the host a bounded amount of work per chain. With a rate limiter, a request that finds the
buckets empty is kept, not dropped, and served when the tokens come back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from isovisor.devices.events import SecurityEventSink
from isovisor.devices.ratelimit import KEEP, BucketSpec, Keep, RateLimiter
from isovisor.devices.virtio.chain import BadRequest, DescriptorChain
from isovisor.devices.virtio.constants import DEVICE_ID_ENTROPY
from isovisor.devices.virtio.device import VirtioDevice
from isovisor.devices.virtio.queue import Virtqueue

QUEUE_SIZE = 256
# Bytes served per chain at most: bounds host work (and getrandom's allocation) per request
# while staying far above what Linux's hw_random core asks for at a time (SMP_CACHE_BYTES
# up to a page).
MAX_REQUEST_BYTES = 64 * 1024


@dataclass
class RngStats:
    requests: int = 0  # chains completed with random bytes
    bytes: int = 0
    capped: int = 0  # requests larger than max_request (served max_request bytes)
    bad_requests: int = 0  # chains with device-readable buffers (§5.4.6.1)
    throttled: int = 0  # times a request waited for the rate limiter


class VirtioRng(VirtioDevice):
    device_type = DEVICE_ID_ENTROPY
    queue_max_sizes = (QUEUE_SIZE,)
    name = "virtio-rng"

    def __init__(
        self,
        events: SecurityEventSink,
        *,
        rate_limiter: RateLimiter | None = None,
        max_request: int = MAX_REQUEST_BYTES,
        entropy: Callable[[int], bytes] = os.getrandom,
    ) -> None:
        super().__init__(events)
        if max_request <= 0:
            raise ValueError("max_request must be positive")
        self.rate_limiter = rate_limiter
        self.max_request = max_request
        self._entropy = entropy
        self.rng_stats = RngStats()
        self._pending: tuple[DescriptorChain, int] | None = None  # (chain, bytes) throttled

    # No device-specific features and no configuration space (§5.4.3, §5.4.4).

    def process_queue(self, index: int, queue: Virtqueue) -> bool:
        while not self.stopping:
            if self._pending is not None:
                chain, n = self._pending
                self._pending = None
            else:
                popped = queue.pop()
                if popped is None:
                    return True
                chain = popped
                try:
                    n = self._request_size(chain)
                except BadRequest:
                    self.rng_stats.bad_requests += 1
                    queue.add_used(chain.head, 0)
                    continue
            limiter = self.rate_limiter
            if n and limiter is not None and not limiter.consume(nbytes=n, nops=1):
                self._pending = (chain, n)
                self.rng_stats.throttled += 1
                return False
            written = chain.write_writable(self._entropy(n)) if n else 0
            queue.add_used(chain.head, written)
            self.rng_stats.requests += 1
            self.rng_stats.bytes += written
        return True

    def _request_size(self, chain: DescriptorChain) -> int:
        """Validate the chain (GuestProtocolError propagates) and size the request."""
        chain.descriptors()
        if chain.readable:
            raise BadRequest("device-readable buffer in an entropy request (§5.4.6.1)")
        n = chain.writable_len
        if n > self.max_request:
            self.rng_stats.capped += 1
            n = self.max_request
        return n

    def next_wakeup(self) -> float | None:
        pending, limiter = self._pending, self.rate_limiter
        if pending is None:
            return None
        if limiter is None:
            return 0.0
        return limiter.time_until(nbytes=pending[1], nops=1)

    def on_reset(self) -> None:
        self._pending = None

    def set_rate_limit(
        self,
        bandwidth: BucketSpec | Keep | None = KEEP,
        ops: BucketSpec | Keep | None = KEEP,
    ) -> None:
        """Change the limits while the VM runs (thread-safe); a throttled request is
        retried at once under the new limits."""
        if self.rate_limiter is None:
            self.rate_limiter = RateLimiter()
        self.rate_limiter.update(bandwidth=bandwidth, ops=ops)
        self.wake()
