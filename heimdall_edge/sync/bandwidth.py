"""The upload bandwidth cap (`[sync] bandwidth_kbps`), shared by every upload's worker thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from heimdall_edge.clock import Clock

BURST_S = 0.25
"""The bandwidth cap lets this many seconds' worth of bytes through at once."""


class UploadHalted(Exception):
    """Raised inside a worker thread's read when the syncer is stopping: end the upload now."""


class TokenBucket:
    """A thread-safe bandwidth cap shared by every upload: `consume(n)` blocks until n bytes fit.

    Reservation style: a caller takes its bytes at once (the balance may go negative)
    and sleeps off the debt outside the lock, so concurrent uploads share the rate
    fairly and a read larger than the burst still goes through.
    """

    def __init__(
        self,
        bytes_per_s: float,
        *,
        burst_bytes: float | None = None,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if bytes_per_s <= 0:
            raise ValueError("bytes_per_s must be positive")
        self.rate = float(bytes_per_s)
        self.burst = float(burst_bytes if burst_bytes is not None else bytes_per_s * BURST_S)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._last = clock()

    def consume(self, n: int) -> float:
        """Take n bytes' worth; returns the seconds slept."""
        if n <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            debt = -self._tokens
        wait = debt / self.rate if debt > 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait
