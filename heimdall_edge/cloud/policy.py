"""Calling the cloud without letting it hurt: skip, rate limit, retry, deadline, slowness.

One retry layer, ours: the SDKs run with their retries off and every cloud call
goes through a `CallPolicy`, which decides whether to call at all (offline?
breaker open?), how fast (rate limit, concurrency), how often (retries with
backoff honouring Retry-After) and for how long (one deadline for the whole
call). Time is injected (`clock`, `sleep`) so tests are exact and never sleep.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, TypeVar

from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_random_exponential

from heimdall_edge.clock import Clock
from heimdall_edge.cloud.breaker import BreakerState, CircuitBreaker
from heimdall_edge.cloud.classify import classify
from heimdall_edge.cloud.errors import RETRYABLE, CloudError, ErrorKind
from heimdall_edge.cloud.gate import Attempt, BreakerGate

if TYPE_CHECKING:
    from heimdall_edge.cloud.connectivity import Connectivity

log = logging.getLogger(__name__)

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


class RateLimit:
    """Requests per minute and requests in flight, for one service.

    Waiting here counts against the call's deadline, so a saturated limiter ends
    in a local fallback rather than a late answer.
    """

    def __init__(self, requests_per_minute: float, concurrency: int) -> None:
        self._rate = AsyncLimiter(requests_per_minute, 60.0)
        self._slots = asyncio.Semaphore(concurrency)

    async def __aenter__(self) -> None:
        await self._slots.acquire()  # a slot first, so waiters do not burn the rate budget
        try:
            await self._rate.acquire()
        except BaseException:
            self._slots.release()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._slots.release()


class LatencyNorm:
    """A service's recent normal time to answer, to tell "far slower than usual" from noise.

    The normal is the median of the last `window` answers, slow ones included, so it
    follows a service that has settled at a new pace instead of refusing it for ever;
    an answer is far slower when it takes more than `factor` times the normal and at
    least `margin_s` more. Until `min_samples` answers are known nothing is far slower:
    the hedge and the deadline still catch a hung service from the first call.
    """

    def __init__(
        self, *, factor: float = 3.0, margin_s: float = 1.0, window: int = 20, min_samples: int = 5
    ) -> None:
        self.factor = factor
        self.margin_s = margin_s
        self.min_samples = min_samples
        self._recent: collections.deque[float] = collections.deque(maxlen=window)

    @property
    def normal_s(self) -> float | None:
        if len(self._recent) < self.min_samples:
            return None
        return statistics.median(self._recent)

    def observe(self, seconds: float) -> bool:
        """Count one answer; True if it was far slower than the normal before it."""
        normal = self.normal_s
        self._recent.append(seconds)
        return normal is not None and seconds > max(normal * self.factor, normal + self.margin_s)


class _WaitBackoffOrRetryAfter(wait_base):
    """Exponential backoff with full jitter, but never less than the server's Retry-After."""

    def __init__(self, base_s: float, max_s: float) -> None:
        self._backoff = wait_random_exponential(multiplier=base_s, max=max_s)

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self._backoff(retry_state)
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None and outcome.failed else None
        if isinstance(error, CloudError) and error.retry_after_s is not None:
            wait = max(wait, error.retry_after_s)
        return wait


class _StopUnlessInTime(stop_base):
    """Stop when the wait plus a minimal attempt would overrun the deadline, or the breaker
    opened meanwhile: a retry that cannot answer in time only delays the fallback."""

    def __init__(
        self, breaker: CircuitBreaker, clock: Clock, deadline_at: float, min_attempt_s: float
    ) -> None:
        self._breaker = breaker
        self._clock = clock
        self._deadline_at = deadline_at
        self._min_attempt_s = min_attempt_s

    def __call__(self, retry_state: RetryCallState) -> bool:
        if self._breaker.state is not BreakerState.CLOSED:
            return True
        left = self._deadline_at - self._clock()
        if retry_state.upcoming_sleep + self._min_attempt_s > left:
            log.info(
                "%s: not retrying: a %.2fs wait leaves too little of the %.2fs left",
                self._breaker.service,
                retry_state.upcoming_sleep,
                left,
            )
            return True
        return False


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, CloudError) and exc.kind in RETRYABLE


class CallPolicy:
    """How one cloud service is called: offline and breaker checks, rate limit, retries, deadline.

    `fn(timeout_s)` performs one attempt with a per-attempt timeout (what is left of
    the deadline). Only RATE_LIMIT, SERVER, TIMEOUT and CONNECTION are retried, and
    only when a retry can still finish within the deadline. Every attempt goes through
    the service's BreakerGate, which tells the breaker and connectivity how it went.

    Slowness is failure, of the service and not of the network: overrunning the
    deadline, or answering far slower than this call's recent normal (`norm`), counts
    SLOW against the breaker; the caller reports a lost hedge the same way
    (`record_slow`). Cancellation itself (a hedge lost, a speculation dropped)
    propagates and is no verdict; `stats` counts it, so what speculation costs in
    cloud calls can be read off the status.
    """

    def __init__(
        self,
        service: str,
        breaker: CircuitBreaker,
        rate_limit: RateLimit,
        *,
        deadline_s: float,
        max_attempts: int = 2,
        backoff_base_s: float = 0.2,
        backoff_max_s: float = 2.0,
        min_attempt_s: float = 0.5,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        connectivity: Connectivity | None = None,
        norm: LatencyNorm | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.service = service
        self.gate = BreakerGate(service, breaker, connectivity)
        self.rate_limit = rate_limit
        self.deadline_s = deadline_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.min_attempt_s = min_attempt_s  # the least time worth starting a retry with
        self.norm = norm or LatencyNorm()
        self.stats: collections.Counter[str] = collections.Counter()
        """Calls made, answered, failed by kind, slow, cancelled, skipped: for the status."""
        self._clock = clock
        self._sleep = sleep

    @property
    def breaker(self) -> CircuitBreaker:
        return self.gate.breaker

    @property
    def connectivity(self) -> Connectivity | None:
        return self.gate.connectivity

    async def call(self, fn: Callable[[float], Awaitable[T]]) -> T:
        """One cloud call within `deadline_s`, or a CloudError saying why not."""
        if self.connectivity is not None and not self.connectivity.online:
            self.stats["skipped"] += 1
            raise CloudError(self.service, ErrorKind.OFFLINE, "device offline; call skipped")
        self.stats["calls"] += 1
        deadline_at = self._clock() + self.deadline_s
        retrying = AsyncRetrying(
            sleep=self._sleep,
            stop=stop_after_attempt(self.max_attempts)
            | _StopUnlessInTime(self.breaker, self._clock, deadline_at, self.min_attempt_s),
            wait=_WaitBackoffOrRetryAfter(self.backoff_base_s, self.backoff_max_s),
            retry=retry_if_exception(_retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )
        scope = asyncio.timeout(self.deadline_s)
        try:
            async with scope:
                return await retrying(self._attempt, fn, deadline_at, scope)
        except TimeoutError as exc:
            if not scope.expired():
                raise
            error = CloudError(
                self.service, ErrorKind.SLOW, f"no answer within {self.deadline_s:g}s"
            )
            log.info("%s", error)
            self.stats["failed"] += 1
            raise error from exc
        except CloudError as error:
            # INFO: the caller falls back and says so; an outage shows as the breaker's WARNING.
            if error.kind not in (ErrorKind.BREAKER_OPEN, ErrorKind.OFFLINE):
                log.info("%s", error)
            self.stats["skipped" if error.kind is ErrorKind.BREAKER_OPEN else "failed"] += 1
            raise
        except asyncio.CancelledError:
            self.stats["cancelled"] += 1
            raise

    async def _attempt(
        self, fn: Callable[[float], Awaitable[T]], deadline_at: float, scope: asyncio.Timeout
    ) -> T:
        with self.gate.attempt() as attempt:
            async with self.rate_limit:
                left = deadline_at - self._clock()
                if left <= 0:
                    raise CloudError(
                        self.service, ErrorKind.TIMEOUT, "deadline reached before the request"
                    )
                started = self._clock()
                try:
                    result = await fn(left)
                except asyncio.CancelledError:
                    if scope.expired():  # our deadline, not a lost hedge: the service was too slow
                        attempt.failed(CloudError(self.service, ErrorKind.SLOW, "deadline reached"))
                    raise
                except Exception as exc:
                    error = classify(exc, self.service)
                    attempt.failed(error)
                    if error is exc:
                        raise
                    raise error from exc
            self._record_answer(attempt, self._clock() - started)
            return result

    def available(self) -> bool:
        """Worth trying the cloud now? (Online and the breaker not open; claims nothing.)"""
        online = self.connectivity is None or self.connectivity.online
        return online and self.breaker.state is not BreakerState.OPEN

    def record_failure(self, error: CloudError) -> None:
        """Count a failure seen outside `call()`, e.g. a stream that broke after its first chunk."""
        self.gate.record_failure(error)

    def record_slow(self, why: str) -> None:
        """The caller gave up on this service for being slow (it lost its hedge): a breaker
        failure, though the network is fine (the call was still going)."""
        self._note_slow(why)
        self.gate.record_failure(CloudError(self.service, ErrorKind.SLOW, why))

    def _note_slow(self, why: str) -> None:
        log.info("%s: slow: %s", self.service, why)
        self.stats["slow"] += 1

    def _record_answer(self, attempt: Attempt, seconds: float) -> None:
        """An answer proves the network; one far slower than usual still fails the service."""
        normal = self.norm.normal_s
        slow = self.norm.observe(seconds)
        if slow:
            self._note_slow(f"answered in {seconds:.2f}s, its recent normal {normal:.2f}s")
        else:
            self.stats["answered"] += 1
        attempt.answered(slow=slow)

    def _log_retry(self, retry_state: RetryCallState) -> None:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        log.info(
            "%s: attempt %d failed (%s); retrying in %.2fs",
            self.service,
            retry_state.attempt_number,
            error,
            retry_state.upcoming_sleep,
        )
