"""Token-bucket rate limiters for device I/O: bandwidth (bytes) and operations.

A `TokenBucket` holds up to `capacity` tokens and refills continuously at
`refill_per_second`; it starts full, plus a `one_time_burst` of extra tokens that are spent
first and never come back (a VM can boot fast, then settles at the rate). A request larger
than the whole bucket is allowed once the bucket is full and leaves it in debt, so big
requests are slowed to the rate rather than refused forever.

A `RateLimiter` combines an optional bandwidth bucket and an optional operations bucket
and consumes from both or neither. A device whose limiter says no does not drop the
request: it keeps it, asks `time_until(...)` how long to wait, sleeps that long in its
epoll timeout and tries again. Everything is thread-safe; `update(...)` changes the rates
of a running VM (the device should then be woken to recompute its timeout).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


@dataclass(frozen=True)
class BucketSpec:
    """The settings of one bucket, as a user gives them (CLI, API)."""

    capacity: int  # tokens (bytes or operations) the bucket holds when full
    refill_per_second: float  # tokens added per second
    one_time_burst: int = 0  # extra tokens at creation, spent first, never refilled

    def __post_init__(self) -> None:
        if self.capacity <= 0 or not math.isfinite(self.refill_per_second):
            raise ValueError(f"bucket capacity must be > 0 and the rate finite: {self}")
        if self.refill_per_second <= 0 or self.one_time_burst < 0:
            raise ValueError(f"bucket rate must be > 0 and the burst >= 0: {self}")


class TokenBucket:
    def __init__(self, spec: BucketSpec, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._spec = spec
        self._budget = float(spec.capacity)
        self._burst = spec.one_time_burst
        self._last = clock()

    @property
    def spec(self) -> BucketSpec:
        return self._spec

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(now - self._last, 0.0)  # a clock that steps back adds nothing
        self._last = now
        cap = self._spec.capacity
        self._budget = min(cap, self._budget + elapsed * self._spec.refill_per_second)

    def _needed(self, n: int) -> float:
        """Budget that must be present to take `n` (the burst counts first; a request
        larger than the bucket needs a full bucket)."""
        return float(min(max(n - self._burst, 0), self._spec.capacity))

    def _can(self, n: int) -> bool:
        return n <= self._burst or self._budget >= self._needed(n)

    def _take(self, n: int) -> None:
        from_burst = min(n, self._burst)
        self._burst -= from_burst
        self._budget -= n - from_burst  # may go negative: debt for an oversized request

    def consume(self, n: int) -> bool:
        """Take `n` tokens if available now; False (nothing taken) otherwise."""
        if n <= 0:
            return True
        with self._lock:
            self._refill()
            if not self._can(n):
                return False
            self._take(n)
            return True

    def time_until(self, n: int) -> float:
        """Seconds until `consume(n)` can succeed (0.0 if it can now)."""
        if n <= 0:
            return 0.0
        with self._lock:
            self._refill()
            return self._wait(n)

    def _wait(self, n: int) -> float:
        if self._can(n):
            return 0.0
        return (self._needed(n) - self._budget) / self._spec.refill_per_second

    def update(self, spec: BucketSpec) -> None:
        """New settings at runtime: tokens earned so far are kept (up to the new capacity)
        and the new one-time burst replaces whatever is left of the old one."""
        with self._lock:
            self._refill()
            self._spec = spec
            self._budget = min(self._budget, float(spec.capacity))
            self._burst = spec.one_time_burst

    @property
    def tokens(self) -> float:
        """Tokens available now (burst included), for metrics and tests."""
        with self._lock:
            self._refill()
            return self._budget + self._burst


class Keep:
    """Sentinel: leave a bucket as it is in RateLimiter.update."""


KEEP = Keep()


class RateLimiter:
    """A bandwidth bucket and an operations bucket, each optional (None = unlimited)."""

    def __init__(
        self,
        bandwidth: BucketSpec | None = None,
        ops: BucketSpec | None = None,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.bandwidth = TokenBucket(bandwidth, clock=clock) if bandwidth else None
        self.ops = TokenBucket(ops, clock=clock) if ops else None
        self.throttled = 0  # refusals, for metrics

    @property
    def unlimited(self) -> bool:
        return self.bandwidth is None and self.ops is None

    def _pairs(self, nbytes: int, nops: int) -> list[tuple[TokenBucket, int]]:
        pairs = []
        if self.bandwidth is not None and nbytes > 0:
            pairs.append((self.bandwidth, nbytes))
        if self.ops is not None and nops > 0:
            pairs.append((self.ops, nops))
        return pairs

    def consume(self, nbytes: int = 0, nops: int = 1) -> bool:
        """Take `nbytes` bandwidth tokens and `nops` operation tokens, both or neither."""
        with self._lock:
            pairs = self._pairs(nbytes, nops)
            for bucket, _ in pairs:
                bucket._lock.acquire()
            try:
                for bucket, _ in pairs:
                    bucket._refill()
                if not all(bucket._can(n) for bucket, n in pairs):
                    self.throttled += 1
                    return False
                for bucket, n in pairs:
                    bucket._take(n)
                return True
            finally:
                for bucket, _ in pairs:
                    bucket._lock.release()

    def time_until(self, nbytes: int = 0, nops: int = 1) -> float:
        """Seconds until consume(nbytes, nops) can succeed (0.0 if it can now)."""
        with self._lock:
            return max(
                (bucket.time_until(n) for bucket, n in self._pairs(nbytes, nops)), default=0.0
            )

    def update(
        self,
        bandwidth: BucketSpec | Keep | None = KEEP,
        ops: BucketSpec | Keep | None = KEEP,
    ) -> None:
        """Change either bucket at runtime: a spec updates (or creates) it, None removes
        the limit, KEEP leaves it."""
        with self._lock:
            self.bandwidth = self._updated(self.bandwidth, bandwidth)
            self.ops = self._updated(self.ops, ops)

    def _updated(
        self, bucket: TokenBucket | None, spec: BucketSpec | Keep | None
    ) -> TokenBucket | None:
        if isinstance(spec, Keep):
            return bucket
        if spec is None:
            return None
        if bucket is None:
            return TokenBucket(spec, clock=self._clock)
        bucket.update(spec)
        return bucket
