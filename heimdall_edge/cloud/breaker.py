"""The circuit breaker: stop calling a service that keeps failing, probe it now and then.

Every cloud caller (speech, replies and the capture store alike) asks its service's
breaker through a BreakerGate (gate.py). Time is injected (`clock`) so tests are
exact and never sleep.
"""

from __future__ import annotations

import collections
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

from heimdall_edge.clock import Clock
from heimdall_edge.cloud.errors import BREAKER_FAILURES, ErrorKind

log = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stops calling a service that keeps failing, so an interaction never pays its timeout.

    Opens after `failure_threshold` failures within `window_s`, or at once on AUTH
    (for `auth_reset_s`: a bad key does not fix itself). After `reset_s` it turns
    half-open and lets exactly one probe through: success closes it, failure
    reopens it for another `reset_s`. Open -> half-open happens with the clock, so
    it is noticed (logged, `on_change` called) the next time anyone asks.

    A caller that got True from `allow()` in half-open must end with
    `record_success()`, `record_failure()` or `release_probe()` (cancelled).
    """

    def __init__(
        self,
        service: str,
        *,
        failure_threshold: int = 3,
        window_s: float = 60.0,
        reset_s: float = 30.0,
        auth_reset_s: float = 600.0,
        clock: Clock = time.monotonic,
        on_change: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self.service = service
        self.failure_threshold = failure_threshold
        self.window_s = window_s
        self.reset_s = reset_s
        self.auth_reset_s = auth_reset_s
        self._clock = clock
        self._on_change = on_change
        self._failures: collections.deque[float] = collections.deque()
        self._opened_at: float | None = None
        self._open_for = reset_s
        self._probe_in_flight = False
        self._last_error: ErrorKind | None = None
        self._known = BreakerState.CLOSED  # the state last reported

    @property
    def state(self) -> BreakerState:
        return self._sync()

    def allow(self) -> bool:
        """May a call go out now? In half-open, True claims the single probe slot."""
        state = self._sync()
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def release_probe(self) -> None:
        """The probe ended without a verdict (cancelled): let the next call probe."""
        self._probe_in_flight = False

    def record_success(self) -> None:
        """The service answered: whatever the state, it is healthy now."""
        self._probe_in_flight = False
        self._failures.clear()
        if self._opened_at is not None:
            self._opened_at = None
            self._sync()

    def record_failure(self, kind: ErrorKind) -> None:
        now = self._clock()
        self._last_error = kind
        state = self._sync()
        if kind not in BREAKER_FAILURES:  # CLIENT: our bug, not an outage; no verdict
            if state is BreakerState.HALF_OPEN:
                self._probe_in_flight = False
            return
        self._failures.append(now)
        self._prune(now)
        probe_failed = state is BreakerState.HALF_OPEN
        too_many = state is BreakerState.CLOSED and len(self._failures) >= self.failure_threshold
        if kind is ErrorKind.AUTH:
            self._open(now, self.auth_reset_s)
        elif probe_failed or too_many:
            self._open(now, self.reset_s)
        # Already open: a late failure of a call that started earlier changes nothing.

    def snapshot(self) -> dict[str, Any]:
        """For `doctor` and the status line."""
        now = self._clock()
        state = self._sync()
        self._prune(now)
        probe_in = None
        if state is BreakerState.OPEN and self._opened_at is not None:
            probe_in = round(self._opened_at + self._open_for - now, 3)
        return {
            "service": self.service,
            "state": state.value,
            "failures_in_window": len(self._failures),
            "opened_at": self._opened_at,
            "probe_in_s": probe_in,
            "last_error": self._last_error.value if self._last_error else None,
        }

    def _prune(self, now: float) -> None:
        while self._failures and self._failures[0] <= now - self.window_s:
            self._failures.popleft()

    def _open(self, now: float, for_s: float) -> None:
        self._opened_at = now
        self._open_for = for_s
        self._probe_in_flight = False
        self._sync()

    def _sync(self) -> BreakerState:
        """The state now; report it if it differs from the last one reported."""
        if self._opened_at is None:
            state = BreakerState.CLOSED
        elif self._clock() - self._opened_at < self._open_for:
            state = BreakerState.OPEN
        else:
            state = BreakerState.HALF_OPEN
        old, self._known = self._known, state
        if state is not old:
            self._report(old, state)
        return state

    def _report(self, old: BreakerState, new: BreakerState) -> None:
        last = self._last_error.value if self._last_error else "none"
        if new is BreakerState.OPEN:
            log.warning(
                "%s: circuit breaker open for %gs (last error: %s); using the local engine",
                self.service,
                self._open_for,
                last,
            )
        elif new is BreakerState.HALF_OPEN:
            log.info("%s: circuit breaker half-open; letting one probe call through", self.service)
        else:
            log.info("%s: circuit breaker closed; the service is answering again", self.service)
        if self._on_change is not None:
            try:
                self._on_change(old, new)
            except Exception:
                log.exception("%s: breaker on_change callback failed", self.service)
