"""Calling the cloud without letting it hurt: classify, breaker, rate limit, retry, deadline.

One retry layer, ours: the SDKs run with their retries off and every cloud call
goes through a `CallPolicy`, which decides whether to call at all (offline?
breaker open?), how fast (rate limit, concurrency), how often (retries with
backoff honouring Retry-After) and for how long (one deadline for the whole
call). Time is injected (`clock`, `sleep`) so tests are exact and never sleep.

Log lines carry the service, the error kind, the HTTP status and a short
message we write ourselves: never request headers, never an SDK exception's
text (it may echo a key or a response body).
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import enum
import errno
import logging
import math
import re
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_random_exponential

if TYPE_CHECKING:
    from heimdall_edge.cloud.connectivity import Connectivity

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class ErrorKind(enum.Enum):
    """Why a cloud call failed, in the terms that decide what to do next."""

    AUTH = "auth"  # 401/403: a bad key does not fix itself
    RATE_LIMIT = "rate_limit"  # 429
    SERVER = "server"  # 5xx
    TIMEOUT = "timeout"
    CONNECTION = "connection"  # refused, DNS, reset
    MALFORMED = "malformed"  # answered, but unparseable / wrong shape / truncated stream
    CLIENT = "client"  # other 4xx: our bug, not an outage
    SLOW = "slow"  # answered too late: lost its hedge, overran its deadline, far off its normal
    BREAKER_OPEN = "breaker_open"  # skipped: the service's breaker is open
    OFFLINE = "offline"  # skipped: the device knows it is offline


RETRYABLE = frozenset(
    {ErrorKind.RATE_LIMIT, ErrorKind.SERVER, ErrorKind.TIMEOUT, ErrorKind.CONNECTION}
)
"""Kinds where the same request may well succeed a moment later."""

BREAKER_FAILURES = frozenset(RETRYABLE | {ErrorKind.MALFORMED, ErrorKind.AUTH, ErrorKind.SLOW})
"""Kinds that say the service is unhealthy (CLIENT is our bug; the skips are not calls).
SLOW is among them: a service that answers after the person was already answered locally
is as useless to the next turn as one that does not answer, and the breaker is what
lets the next turns skip it instead of paying the hedge delay every time."""


class CloudError(Exception):
    """A cloud call that failed or was skipped; its text is safe to log."""

    def __init__(
        self,
        service: str,
        kind: ErrorKind,
        message: str = "",
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.service = service
        self.kind = kind
        self.status = status
        self.retry_after_s = retry_after_s
        self.message = message[:120]
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.service}: {self.kind.value}"
        if self.status is not None:
            text += f" (HTTP {self.status})"
        return f"{text}: {self.message}" if self.message else text

    def __repr__(self) -> str:
        return f"CloudError({str(self)!r})"


# --- classify -------------------------------------------------------------------------------------

_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})
_SAFE_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _loaded(module: str) -> Any:
    """A module if it is already imported: an exception from a library we never imported
    cannot be one of its classes, so classify() costs no imports of heavy SDKs."""
    return sys.modules.get(module)


def parse_retry_after(headers: Mapping[str, str] | None, *, now: Clock = time.time) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI), `Retry-After` seconds or HTTP-date."""
    if not headers:
        return None
    lower = {str(key).lower(): str(value) for key, value in headers.items()}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = lower.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            continue
        if not math.isnan(seconds):
            return max(0.0, seconds)
    value = lower.get("retry-after")
    if value is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        return None
    return max(0.0, when.timestamp() - now())


def _kind_for_status(status: int) -> ErrorKind:
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 429:
        return ErrorKind.RATE_LIMIT
    if status == 408:  # the server gave up waiting for us: as retryable as our own timeout
        return ErrorKind.TIMEOUT
    if status >= 500:
        return ErrorKind.SERVER
    if status >= 400:
        return ErrorKind.CLIENT
    return ErrorKind.MALFORMED  # an "error" with a 2xx/3xx status: the answer did not parse


def _error_code(body: object) -> str | None:
    """OpenAI's machine-readable error code (e.g. insufficient_quota), if it looks like one."""
    if isinstance(body, Mapping):
        inner = body.get("error")
        code = inner.get("code") if isinstance(inner, Mapping) else body.get("code")
        if isinstance(code, str) and _SAFE_CODE.fullmatch(code):
            return code
    return None


def _from_status(
    service: str, exc: BaseException, status: int, headers: Mapping[str, str] | None, body: object
) -> CloudError:
    kind = _kind_for_status(status)
    code = getattr(exc, "code", None) or _error_code(body)
    message = type(exc).__name__
    if isinstance(code, str) and _SAFE_CODE.fullmatch(code):
        message += f" [{code}]"
        if code == "insufficient_quota":
            # A 429 that no wait will fix: the account is out of credit. Treat it like a
            # bad key: no retries, and the breaker stays open for the long auth reset.
            kind = ErrorKind.AUTH
    retry_after = parse_retry_after(headers) if kind in RETRYABLE else None
    return CloudError(service, kind, message, status=status, retry_after_s=retry_after)


def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeouts, connection failures) from httpx (ElevenLabs) and httpx2 (OpenAI) if loaded."""
    # asyncio.TimeoutError is the builtin since 3.11; refused and reset are ConnectionErrors.
    timeouts: list[type[BaseException]] = [TimeoutError]
    connection: list[type[BaseException]] = [ConnectionError, socket.gaierror]
    for name in ("httpx", "httpx2"):
        module = _loaded(name)
        if module is not None:
            timeouts.append(module.TimeoutException)
            connection.append(module.TransportError)
    openai = _loaded("openai")
    if openai is not None:
        timeouts.append(openai.APITimeoutError)  # subclass of APIConnectionError: test it first
        connection.append(openai.APIConnectionError)
    return tuple(timeouts), tuple(connection)


def classify(exc: BaseException, service: str, *, mid_stream: bool = False) -> CloudError:
    """Map an SDK, httpx or builtin exception to a CloudError with a safe message.

    `mid_stream=True` says the response had started arriving and part of it was
    already used (played, shown): a transport error then means a truncated stream
    and is MALFORMED, which is not retried, since a retry would repeat what was
    already used. Before any byte arrived, the same error (httpx's
    RemoteProtocolError "server disconnected", ReadError "connection reset") is
    the network failing, CONNECTION, and retrying it is safe.
    """
    if isinstance(exc, CloudError):
        return exc
    name = type(exc).__name__

    openai = _loaded("openai")
    if openai is not None and isinstance(exc, openai.APIResponseValidationError):
        return CloudError(service, ErrorKind.MALFORMED, name, status=exc.status_code)
    if openai is not None and isinstance(exc, openai.APIStatusError):
        return _from_status(service, exc, exc.status_code, exc.response.headers, exc.body)
    api_error = _loaded("elevenlabs.core.api_error")
    if api_error is not None and isinstance(exc, api_error.ApiError):
        if exc.status_code is None:
            return CloudError(service, ErrorKind.MALFORMED, name)
        return _from_status(service, exc, exc.status_code, exc.headers, exc.body)
    for module in (_loaded("httpx"), _loaded("httpx2")):
        if module is not None and isinstance(exc, module.HTTPStatusError):
            response = exc.response
            return _from_status(service, exc, response.status_code, response.headers, None)
        if module is not None and isinstance(
            exc, (module.UnsupportedProtocol, module.LocalProtocolError)
        ):
            return CloudError(service, ErrorKind.CLIENT, name)  # a bad URL or request: ours

    timeouts, connection = _transport_errors()
    unreachable = isinstance(exc, OSError) and exc.errno in _UNREACHABLE
    if isinstance(exc, timeouts + connection) or unreachable:
        if mid_stream:
            return CloudError(service, ErrorKind.MALFORMED, f"stream cut short ({name})")
        kind = ErrorKind.TIMEOUT if isinstance(exc, timeouts) else ErrorKind.CONNECTION
        return CloudError(service, kind, name)

    malformed: tuple[type[BaseException], ...] = (ValueError, KeyError, IndexError)
    # ValueError covers json.JSONDecodeError and pydantic's ValidationError.
    parse_error = _loaded("elevenlabs.core.parse_error")
    if parse_error is not None:
        malformed += (parse_error.ParsingError,)
    if openai is not None:
        malformed += (openai.LengthFinishReasonError, openai.ContentFilterFinishReasonError)
    for module in (_loaded("httpx"), _loaded("httpx2")):
        if module is not None:
            malformed += (module.DecodingError,)
    if isinstance(exc, malformed):
        return CloudError(service, ErrorKind.MALFORMED, name)
    # Anything else is a bug on our side; it must not look like an outage.
    return CloudError(service, ErrorKind.CLIENT, f"unexpected {name}")


# --- circuit breaker ------------------------------------------------------------------------------


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


# --- rate limit -----------------------------------------------------------------------------------


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


# --- recent normal latency -----------------------------------------------------------------------


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


# --- call policy ----------------------------------------------------------------------------------


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
    only when a retry can still finish within the deadline. Every attempt's outcome
    goes to the breaker and to connectivity.

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
        self.breaker = breaker
        self.rate_limit = rate_limit
        self.deadline_s = deadline_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.min_attempt_s = min_attempt_s  # the least time worth starting a retry with
        self.connectivity = connectivity
        self.norm = norm or LatencyNorm()
        self.stats: collections.Counter[str] = collections.Counter()
        """Calls made, answered, failed by kind, slow, cancelled, skipped: for the status."""
        self._clock = clock
        self._sleep = sleep

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
        probing = self.breaker.state is BreakerState.HALF_OPEN
        if not self.breaker.allow():
            raise CloudError(
                self.service, ErrorKind.BREAKER_OPEN, "circuit breaker open; call skipped"
            )
        settled = False
        try:
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
                        self._record_failure(ErrorKind.SLOW)
                        settled = True
                    raise
                except Exception as exc:
                    error = classify(exc, self.service)
                    self._record_failure(error.kind)
                    settled = True
                    if error is exc:
                        raise
                    raise error from exc
            self._record_answer(self._clock() - started)
            settled = True
            return result
        finally:
            if probing and not settled:
                self.breaker.release_probe()

    def available(self) -> bool:
        """Worth trying the cloud now? (Online and the breaker not open; claims nothing.)"""
        online = self.connectivity is None or self.connectivity.online
        return online and self.breaker.state is not BreakerState.OPEN

    def record_failure(self, error: CloudError) -> None:
        """Count a failure seen outside `call()`, e.g. a stream that broke after its first chunk."""
        self._record_failure(error.kind)

    def record_slow(self, why: str) -> None:
        """The caller gave up on this service for being slow (it lost its hedge): a breaker
        failure, though the network is fine (the call was still going)."""
        log.info("%s: slow: %s", self.service, why)
        self.stats["slow"] += 1
        self.breaker.record_failure(ErrorKind.SLOW)

    def _record_answer(self, seconds: float) -> None:
        """An answer proves the network; one far slower than usual still fails the service."""
        normal = self.norm.normal_s
        if self.norm.observe(seconds):
            self.record_slow(f"answered in {seconds:.2f}s, its recent normal {normal:.2f}s")
        else:
            self.stats["answered"] += 1
            self.breaker.record_success()
        if self.connectivity is not None:
            self.connectivity.record_success()

    def _record_failure(self, kind: ErrorKind) -> None:
        self.breaker.record_failure(kind)
        if self.connectivity is not None:
            self.connectivity.record_failure(kind)

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
