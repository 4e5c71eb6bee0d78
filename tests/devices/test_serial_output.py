"""Serial output: rate cap, total limit, notices, flushing, tail."""

from __future__ import annotations

import contextlib
import io
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from isovisor.devices.legacy.serial_output import (
    LIMIT_NOTICE,
    RATE_NOTICE,
    SerialOutput,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FlushCounting(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_bytes_pass_through_and_are_flushed() -> None:
    out = FlushCounting()
    s = SerialOutput(out)
    s.write(b"hello ")
    s.write(b"world\n")
    assert out.getvalue() == b"hello world\n"
    assert out.flushes == 2
    assert s.stats.written == 12


def test_output_appears_through_a_pipe_without_close() -> None:
    r, w = os.pipe()
    with os.fdopen(w, "wb") as wf:
        s = SerialOutput(wf)
        s.write(b"login: ")  # no newline: must still be visible
        os.set_blocking(r, False)
        assert os.read(r, 100) == b"login: "
    os.close(r)


def test_rate_cap_drops_counts_and_notices_once_per_episode() -> None:
    out = io.BytesIO()
    clock = FakeClock()
    s = SerialOutput(out, rate=100, burst=50, clock=clock)
    s.write(b"a" * 40)
    s.write(b"b" * 40)  # 10 fit, 30 dropped: an episode starts
    s.write(b"c" * 5)  # still limited: no second notice
    assert s.stats.dropped_rate == 35
    assert s.stats.rate_episodes == 1
    assert out.getvalue() == b"a" * 40 + b"b" * 10 + b"\n" + RATE_NOTICE
    clock.now += 0.1  # 10 tokens back: the episode continues
    s.write(b"d" * 20)
    assert s.stats.dropped_rate == 45
    assert out.getvalue().count(RATE_NOTICE) == 1
    clock.now += 1.0  # bucket full again: episode over
    s.write(b"e\n")
    s.write(b"f" * 60)
    assert s.stats.rate_episodes == 2
    assert out.getvalue().endswith(b"e\n" + b"f" * 48 + b"\n" + RATE_NOTICE)
    assert s.stats.written == 40 + 10 + 10 + 2 + 48


def test_rate_refills_at_the_configured_rate() -> None:
    out = io.BytesIO()
    clock = FakeClock()
    s = SerialOutput(out, rate=1000, burst=10, clock=clock)
    s.write(b"x" * 10)
    clock.now += 0.005  # 5 tokens
    s.write(b"y" * 10)
    assert s.stats.written == 15
    assert s.stats.dropped_rate == 5


def test_total_limit_stops_output_for_good() -> None:
    out = io.BytesIO()
    s = SerialOutput(out, rate=None, total_limit=10)
    s.write(b"12345678")
    s.write(b"abcd")
    s.write(b"more")
    assert out.getvalue() == b"12345678ab\n" + LIMIT_NOTICE
    assert s.stats.written == 10
    assert s.stats.dropped_limit == 6


def test_tail_keeps_the_last_bytes_including_dropped_ones() -> None:
    s = SerialOutput(None, rate=None, total_limit=3, tail_size=8)
    for chunk in (b"abc", b"defgh", b"ijklmnopq", b"rs"):
        s.write(chunk)
    assert s.tail() == b"lmnopqrs"
    assert SerialOutput(None).tail() == b""


def test_broken_pipe_is_contained() -> None:
    r, w = os.pipe()
    wf = os.fdopen(w, "wb")
    os.close(r)
    s = SerialOutput(wf)
    s.write(b"x")
    s.write(b"y")
    assert s.stats.dropped_error == 2
    assert s.stats.written == 0
    with contextlib.suppress(BrokenPipeError):
        wf.close()


def test_closed_file_is_contained() -> None:
    out = io.BytesIO()
    out.close()
    s = SerialOutput(out)
    s.write(b"abc")
    assert s.stats.dropped_error == 3


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.binary(max_size=300), st.floats(0, 2)), max_size=40),
    st.integers(1, 500),
    st.integers(0, 2000),
)
def test_random_writes_respect_caps(
    writes: list[tuple[bytes, float]], burst: int, limit: int
) -> None:
    out = io.BytesIO()
    clock = FakeClock()
    rate = 200
    s = SerialOutput(out, rate=rate, burst=burst, total_limit=limit, tail_size=64, clock=clock)
    offered = 0
    for data, dt in writes:
        clock.now += dt
        s.write(data)
        offered += len(data)
    elapsed = clock.now - 100.0
    st_ = s.stats
    assert st_.written + st_.dropped_rate + st_.dropped_limit == offered
    assert st_.written <= limit
    assert st_.written <= burst + elapsed * rate + 1
    text = out.getvalue()
    notice_bytes = text.count(RATE_NOTICE) * (len(RATE_NOTICE) + 1)
    notice_bytes += text.count(LIMIT_NOTICE) * (len(LIMIT_NOTICE) + 1)
    assert len(text) <= st_.written + notice_bytes
    assert len(s.tail()) <= 64
