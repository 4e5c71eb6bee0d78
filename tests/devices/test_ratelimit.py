"""Token buckets and rate limiters, driven by an injected clock."""

from __future__ import annotations

import threading

import pytest

from isovisor.devices.ratelimit import BucketSpec, RateLimiter, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_spec_validation() -> None:
    for bad in ((0, 1.0), (10, 0.0), (10, -1.0), (10, float("inf"))):
        with pytest.raises(ValueError):
            BucketSpec(*bad)
    with pytest.raises(ValueError):
        BucketSpec(10, 1.0, one_time_burst=-1)


def test_bucket_starts_full_and_refills_at_rate() -> None:
    clk = Clock()
    b = TokenBucket(BucketSpec(100, 50.0), clock=clk)
    assert b.consume(100)
    assert not b.consume(1)
    assert b.time_until(25) == pytest.approx(0.5)
    clk.advance(0.5)
    assert b.consume(25)
    assert not b.consume(1)
    clk.advance(100)  # refill stops at capacity
    assert b.tokens == pytest.approx(100)


def test_one_time_burst_is_spent_first_and_never_returns() -> None:
    clk = Clock()
    b = TokenBucket(BucketSpec(10, 10.0, one_time_burst=1000), clock=clk)
    assert b.tokens == 1010
    assert b.consume(1005)  # 1000 from the burst, 5 from the budget
    assert b.tokens == pytest.approx(5)
    clk.advance(60)
    assert b.tokens == pytest.approx(10)  # the burst is gone for good


def test_request_larger_than_bucket_waits_for_full_bucket_then_owes() -> None:
    clk = Clock()
    b = TokenBucket(BucketSpec(100, 100.0), clock=clk)
    assert b.consume(50)
    assert b.time_until(300) == pytest.approx(0.5)  # needs a full bucket, not 300 tokens
    clk.advance(0.5)
    assert b.consume(300)
    assert b.tokens == pytest.approx(-200)  # debt: paid back at the rate
    assert b.time_until(1) == pytest.approx(2.01)


def test_long_run_rate_is_held() -> None:
    """Greedy consumers over 10 simulated seconds get capacity + rate * time, no more."""
    clk = Clock()
    b = TokenBucket(BucketSpec(1000, 4096.0), clock=clk)
    got = 0
    for _ in range(10_000):
        clk.advance(0.001)
        while b.consume(512):
            got += 512
    assert 1000 + 4096 * 10 - 512 <= got <= 1000 + 4096 * 10


def test_clock_going_backwards_adds_nothing() -> None:
    clk = Clock()
    b = TokenBucket(BucketSpec(10, 1.0), clock=clk)
    assert b.consume(10)
    clk.advance(-100)
    assert not b.consume(1)
    clk.advance(1)
    assert b.consume(1)


def test_update_at_runtime() -> None:
    clk = Clock()
    b = TokenBucket(BucketSpec(100, 10.0), clock=clk)
    assert b.consume(100)
    clk.advance(1)  # 10 tokens earned at the old rate
    b.update(BucketSpec(1000, 1000.0, one_time_burst=5))
    assert b.tokens == pytest.approx(15)
    clk.advance(0.1)
    assert b.tokens == pytest.approx(115)
    b.update(BucketSpec(50, 1.0))  # shrinking caps what is there
    assert b.tokens == pytest.approx(50)


def test_limiter_consumes_both_or_neither() -> None:
    clk = Clock()
    lim = RateLimiter(BucketSpec(1000, 1000.0), BucketSpec(2, 1.0), clock=clk)
    assert lim.consume(nbytes=400)
    assert lim.consume(nbytes=400)
    assert not lim.consume(nbytes=100)  # ops exhausted: bytes must not be taken
    assert lim.bandwidth is not None and lim.bandwidth.tokens == pytest.approx(200)
    assert lim.time_until(nbytes=100) == pytest.approx(1.0)  # waiting on ops
    assert lim.time_until(nbytes=900, nops=0) == pytest.approx(0.7)  # waiting on bytes
    assert lim.throttled == 1


def test_unlimited_and_partial_limiters() -> None:
    assert RateLimiter().unlimited
    assert RateLimiter().consume(nbytes=1 << 40, nops=1 << 20)
    clk = Clock()
    ops_only = RateLimiter(ops=BucketSpec(1, 1.0), clock=clk)
    assert ops_only.consume(nbytes=1 << 30)
    assert not ops_only.consume(nbytes=0)


def test_limiter_update_creates_changes_and_removes() -> None:
    clk = Clock()
    lim = RateLimiter(clock=clk)
    lim.update(bandwidth=BucketSpec(10, 10.0))
    assert lim.consume(nbytes=10) and not lim.consume(nbytes=1)
    lim.update(ops=BucketSpec(5, 5.0))  # bandwidth kept
    assert lim.bandwidth is not None and lim.ops is not None
    lim.update(bandwidth=None)
    assert lim.bandwidth is None and lim.consume(nbytes=10_000)


def test_concurrent_consumers_never_overdraw() -> None:
    lim = RateLimiter(BucketSpec(10_000, 1e-3))  # effectively no refill during the test
    taken = []
    lock = threading.Lock()

    def worker() -> None:
        n = 0
        for _ in range(2000):
            if lim.consume(nbytes=7):
                n += 7
        with lock:
            taken.append(n)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(taken) == 10_000 // 7 * 7
