"""Where a guest's serial output goes: a host file, rate-capped and size-capped.

A guest can transmit as fast as it can exit; without limits it could flood the host's
terminal, the log collector, or the disk. `SerialOutput` passes bytes through a token
bucket (bytes per second with a burst) and an optional lifetime byte limit. Bytes over
either cap are dropped and counted, and a one-line notice marks each limiting episode.
Every accepted write is flushed, so output appears promptly through a pipe.

It also keeps an optional in-memory tail of everything the guest transmitted (including
bytes the caps dropped from the file), for tests and for failure reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

log = logging.getLogger(__name__)

DEFAULT_RATE = 1024 * 1024  # bytes/second: far above any interactive console
DEFAULT_BURST = 256 * 1024  # a boot log's worth before throttling starts
_EPSILON = 1e-6  # so float rounding in the refill never costs a whole byte
RATE_NOTICE = b"[isovisor: serial output rate-limited, dropping]\n"
LIMIT_NOTICE = b"[isovisor: serial output limit reached, dropping the rest]\n"


@dataclass
class SerialOutputStats:
    written: int = 0  # guest bytes written to the file
    dropped_rate: int = 0  # guest bytes over the rate cap
    dropped_limit: int = 0  # guest bytes over the total limit
    dropped_error: int = 0  # guest bytes lost to a failing or closed file
    rate_episodes: int = 0  # how many times the rate cap started dropping


class SerialOutput:
    """A `TxSink` writing to a binary file object with a rate cap and a total limit.

    `out` may be None (keep only the tail). `rate` None disables the rate cap;
    `total_limit` None disables the lifetime limit. `clock` returns monotonic seconds.
    """

    def __init__(
        self,
        out: BinaryIO | None,
        *,
        rate: float | None = DEFAULT_RATE,
        burst: int = DEFAULT_BURST,
        total_limit: int | None = None,
        tail_size: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = out
        self._rate = rate if rate is None else max(rate, 0.0)
        self._burst = max(burst, 1)
        self._total_limit = total_limit if total_limit is None else max(total_limit, 0)
        self._tail_size = max(tail_size, 0)
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens = float(self._burst)
        self._last = clock()
        self._rate_limited = False  # inside a limiting episode
        self._limit_noticed = False
        self._broken = False  # the file failed for good
        self._last_byte = b"\n"  # the last byte written to the file (for notice placement)
        self._tail = bytearray()
        self.stats = SerialOutputStats()

    def write(self, data: bytes) -> None:
        """Accept guest bytes; never raises, never blocks on the caps."""
        if not data:
            return
        with self._lock:
            self._record_tail(data)
            notices: list[bytes] = []
            n = self._apply_total_limit(len(data), notices)
            n = self._take_tokens(n, notices)
            self._write_out(data[:n], b"".join(notices))

    def tail(self) -> bytes:
        """The last `tail_size` bytes the guest transmitted."""
        with self._lock:
            return bytes(self._tail[-self._tail_size :]) if self._tail_size else b""

    # -- internals (lock held) --------------------------------------------------------

    def _apply_total_limit(self, n: int, notices: list[bytes]) -> int:
        if self._total_limit is None:
            return n
        allowed = min(n, max(0, self._total_limit - self.stats.written))
        if allowed < n:
            self.stats.dropped_limit += n - allowed
            if not self._limit_noticed:
                self._limit_noticed = True
                notices.append(LIMIT_NOTICE)
        return allowed

    def _take_tokens(self, n: int, notices: list[bytes]) -> int:
        """Apply the token bucket to `n` bytes; returns how many may be written."""
        if self._rate is None:
            return n
        now = self._clock()
        elapsed = max(0.0, now - self._last)
        self._last = now
        self._tokens = min(float(self._burst), self._tokens + elapsed * self._rate)
        if self._rate_limited and self._tokens >= self._burst:
            self._rate_limited = False  # the guest was quiet long enough: episode over
        allowed = min(n, int(self._tokens + _EPSILON))
        self._tokens -= allowed
        if allowed < n:
            self.stats.dropped_rate += n - allowed
            if not self._rate_limited:
                self._rate_limited = True
                self.stats.rate_episodes += 1
                notices.append(RATE_NOTICE)
        return allowed

    def _record_tail(self, data: bytes) -> None:
        if not self._tail_size:
            return
        self._tail += data[-self._tail_size :]
        if len(self._tail) > 2 * self._tail_size:  # trim in batches: O(1) amortised
            del self._tail[: len(self._tail) - self._tail_size]

    def _write_out(self, data: bytes, notice: bytes) -> None:
        payload = data
        if notice:
            # Start the notice on its own line, whatever the guest left half-written.
            last = data[-1:] or self._last_byte
            payload = data + (b"" if last == b"\n" else b"\n") + notice
        if not payload:
            return
        if self._out is None:
            self.stats.written += len(data)  # tail-only: nothing to fail
            return
        if self._broken:
            self.stats.dropped_error += len(data)
            return
        try:
            self._out.write(payload)
            self._out.flush()
        except (BrokenPipeError, ValueError):
            # The reader went away or the file was closed: stop trying.
            log.warning("serial output: file closed, discarding further output")
            self._broken = True
            self.stats.dropped_error += len(data)
            return
        except OSError:
            self.stats.dropped_error += len(data)
            return
        self.stats.written += len(data)
        self._last_byte = payload[-1:]
