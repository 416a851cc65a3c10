"""Resilience: error classification on real SDK exceptions, breaker, rate limit, call policy.

Time is a fake clock advanced by a fake sleep, so nothing here really waits
(one test uses a 50 ms real deadline to prove asyncio.timeout bounds a call).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import socket
from collections.abc import Awaitable
from typing import Any

import elevenlabs.core.api_error
import elevenlabs.core.parse_error
import elevenlabs.errors
import httpx
import httpx2
import openai
import pydantic
import pytest

from heimdall_edge.cloud.breaker import BreakerState, CircuitBreaker
from heimdall_edge.cloud.classify import classify, parse_retry_after
from heimdall_edge.cloud.connectivity import Connectivity
from heimdall_edge.cloud.errors import CloudError, ErrorKind
from heimdall_edge.cloud.policy import CallPolicy, LatencyNorm, RateLimit
from heimdall_edge.testing.clocks import FakeClock

SECRET = "sk-test-SECRET-0123456789"
TIMEOUT = 5.0  # every async test is bounded


# --- real SDK exception objects -------------------------------------------------------------------

OPENAI_URL = "https://api.openai.com/v1/audio/transcriptions"


def openai_error(
    cls: type[openai.APIStatusError],
    status: int,
    headers: dict[str, str] | None = None,
    body: object = None,
) -> openai.APIStatusError:
    """As the SDK builds it: the request carries the key, the message may echo it."""
    request = httpx2.Request("POST", OPENAI_URL, headers={"Authorization": f"Bearer {SECRET}"})
    response = httpx2.Response(status, headers=headers or {}, request=request)
    return cls(
        f"Error code: {status} - Incorrect API key provided: {SECRET}", response=response, body=body
    )


def openai_request() -> httpx2.Request:
    return httpx2.Request("POST", OPENAI_URL, headers={"Authorization": f"Bearer {SECRET}"})


def eleven_error(
    status: int | None, headers: dict[str, str] | None = None, body: object = None
) -> elevenlabs.core.api_error.ApiError:
    return elevenlabs.core.api_error.ApiError(status_code=status, headers=headers, body=body)


def pydantic_error() -> pydantic.ValidationError:
    class Shape(pydantic.BaseModel):
        text: str

    try:
        Shape.model_validate({"txt": 1})
    except pydantic.ValidationError as exc:
        return exc
    raise AssertionError("unreachable")


def json_error() -> json.JSONDecodeError:
    try:
        json.loads("<html>")
    except json.JSONDecodeError as exc:
        return exc
    raise AssertionError("unreachable")


@pytest.mark.parametrize(
    ("exc", "kind", "status"),
    [
        (openai_error(openai.AuthenticationError, 401), ErrorKind.AUTH, 401),
        (openai_error(openai.PermissionDeniedError, 403), ErrorKind.AUTH, 403),
        (openai_error(openai.RateLimitError, 429), ErrorKind.RATE_LIMIT, 429),
        (openai_error(openai.InternalServerError, 503), ErrorKind.SERVER, 503),
        (openai_error(openai.APIStatusError, 502), ErrorKind.SERVER, 502),
        (openai_error(openai.BadRequestError, 400), ErrorKind.CLIENT, 400),
        (openai_error(openai.NotFoundError, 404), ErrorKind.CLIENT, 404),
        (openai_error(openai.APIStatusError, 408), ErrorKind.TIMEOUT, 408),
        (openai.APITimeoutError(request=openai_request()), ErrorKind.TIMEOUT, None),
        (openai.APIConnectionError(request=openai_request()), ErrorKind.CONNECTION, None),
        (
            openai.APIResponseValidationError(
                httpx2.Response(200, request=openai_request()), body=None
            ),
            ErrorKind.MALFORMED,
            200,
        ),
        (eleven_error(401, body={"detail": {"status": "invalid_api_key"}}), ErrorKind.AUTH, 401),
        (elevenlabs.errors.UnauthorizedError(body=None), ErrorKind.AUTH, 401),
        (eleven_error(429), ErrorKind.RATE_LIMIT, 429),
        (eleven_error(500), ErrorKind.SERVER, 500),
        (eleven_error(400), ErrorKind.CLIENT, 400),
        (elevenlabs.errors.UnprocessableEntityError(body=None), ErrorKind.CLIENT, 422),
        (eleven_error(200, body="<html>captive portal</html>"), ErrorKind.MALFORMED, 200),
        (elevenlabs.core.parse_error.ParsingError(status_code=200), ErrorKind.MALFORMED, None),
        (httpx.ConnectError("refused"), ErrorKind.CONNECTION, None),
        (httpx.ReadTimeout("slow"), ErrorKind.TIMEOUT, None),
        (httpx.ConnectTimeout("slow"), ErrorKind.TIMEOUT, None),
        (httpx.RemoteProtocolError("server disconnected"), ErrorKind.CONNECTION, None),
        (httpx.ReadError("reset"), ErrorKind.CONNECTION, None),
        (httpx.UnsupportedProtocol("ftp://"), ErrorKind.CLIENT, None),
        (httpx2.ConnectError("refused"), ErrorKind.CONNECTION, None),
        (httpx2.ReadTimeout("slow"), ErrorKind.TIMEOUT, None),
        (TimeoutError(), ErrorKind.TIMEOUT, None),
        (ConnectionRefusedError(111, "refused"), ErrorKind.CONNECTION, None),
        (ConnectionResetError(104, "reset"), ErrorKind.CONNECTION, None),
        (socket.gaierror(-2, "Name or service not known"), ErrorKind.CONNECTION, None),
        (OSError(101, "Network is unreachable"), ErrorKind.CONNECTION, None),
        (json_error(), ErrorKind.MALFORMED, None),
        (pydantic_error(), ErrorKind.MALFORMED, None),
        (KeyError("text"), ErrorKind.MALFORMED, None),
        (ValueError("no text"), ErrorKind.MALFORMED, None),
        (RuntimeError("a bug of ours"), ErrorKind.CLIENT, None),
        (FileNotFoundError(2, "nope"), ErrorKind.CLIENT, None),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_classify_real_exceptions(exc: BaseException, kind: ErrorKind, status: int | None) -> None:
    error = classify(exc, "svc")
    assert (error.service, error.kind, error.status) == ("svc", kind, status)
    assert SECRET not in str(error) and SECRET not in repr(error)


def test_classify_retry_after_seconds_from_openai() -> None:
    exc = openai_error(openai.RateLimitError, 429, {"retry-after": "2"})
    assert classify(exc, "openai").retry_after_s == 2.0


def test_classify_prefers_openai_retry_after_ms() -> None:
    exc = openai_error(openai.RateLimitError, 429, {"retry-after-ms": "1500", "retry-after": "9"})
    assert classify(exc, "openai").retry_after_s == 1.5


def test_classify_retry_after_from_elevenlabs_headers() -> None:
    exc = eleven_error(
        429, headers={"Retry-After": "3", "xi-api-key": SECRET}, body={"detail": SECRET}
    )
    error = classify(exc, "elevenlabs")
    assert (error.kind, error.retry_after_s) == (ErrorKind.RATE_LIMIT, 3.0)
    assert SECRET not in str(error)


def test_classify_keeps_retry_after_only_where_a_retry_is_possible() -> None:
    exc = openai_error(openai.AuthenticationError, 401, {"retry-after": "2"})
    assert classify(exc, "openai").retry_after_s is None


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    when = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after({"Retry-After": when}, now=lambda: now) == pytest.approx(7.0)
    assert parse_retry_after({"Retry-After": when}, now=lambda: now + 60) == 0.0


@pytest.mark.parametrize("value", ["soon", "", "nan"])
def test_retry_after_garbage_is_ignored(value: str) -> None:
    assert parse_retry_after({"retry-after": value}) is None


def test_classify_insufficient_quota_is_not_a_passing_rate_limit() -> None:
    body = {"code": "insufficient_quota", "message": "You exceeded your current quota"}
    error = classify(openai_error(openai.RateLimitError, 429, {"retry-after": "1"}, body), "openai")
    assert (error.kind, error.status, error.retry_after_s) == (ErrorKind.AUTH, 429, None)
    assert "insufficient_quota" in str(error)


def test_classify_mid_stream_transport_error_is_a_truncated_stream() -> None:
    for exc in (
        httpx.RemoteProtocolError("incomplete chunked read"),
        httpx.ReadError("reset"),
        httpx.ReadTimeout("stalled"),
    ):
        assert classify(exc, "elevenlabs", mid_stream=True).kind is ErrorKind.MALFORMED


def test_classify_passes_cloud_errors_through() -> None:
    error = CloudError("svc", ErrorKind.SERVER, "x", status=500)
    assert classify(error, "other") is error


# --- circuit breaker ------------------------------------------------------------------------------


def make_breaker(clock: FakeClock, **kwargs: Any) -> CircuitBreaker:
    options: dict[str, Any] = {
        "failure_threshold": 3,
        "window_s": 60.0,
        "reset_s": 30.0,
        "auth_reset_s": 600.0,
    }
    return CircuitBreaker("svc", clock=clock, **(options | kwargs))


def test_breaker_opens_at_threshold_within_window() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    for _ in range(2):
        breaker.record_failure(ErrorKind.SERVER)
        clock.advance(10)
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.record_failure(ErrorKind.TIMEOUT)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()


def test_breaker_failures_outside_window_do_not_count() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    breaker.record_failure(ErrorKind.SERVER)  # t=0
    clock.advance(30)
    breaker.record_failure(ErrorKind.CONNECTION)  # t=30
    clock.advance(30)  # t=60: the first one has left the 60 s window
    breaker.record_failure(ErrorKind.RATE_LIMIT)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["failures_in_window"] == 2
    clock.advance(1)
    breaker.record_failure(ErrorKind.MALFORMED)  # t=61: 30, 60, 61
    assert breaker.state is BreakerState.OPEN


def test_breaker_success_clears_the_count() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    breaker.record_failure(ErrorKind.SERVER)
    breaker.record_failure(ErrorKind.SERVER)
    breaker.record_success()
    breaker.record_failure(ErrorKind.SERVER)
    assert breaker.state is BreakerState.CLOSED


def test_breaker_client_errors_never_open_it() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    for _ in range(10):
        breaker.record_failure(ErrorKind.CLIENT)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["last_error"] == "client"


def test_breaker_auth_opens_at_once_and_for_longer() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)
    breaker.record_failure(ErrorKind.AUTH)
    assert breaker.state is BreakerState.OPEN
    clock.advance(30 + 1)  # past reset_s, not past auth_reset_s
    assert breaker.state is BreakerState.OPEN
    clock.advance(600 - 31 - 0.001)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.001)
    assert breaker.state is BreakerState.HALF_OPEN


def test_breaker_half_open_admits_exactly_one_probe_then_success_closes() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=1)
    breaker.record_failure(ErrorKind.SERVER)
    clock.advance(29.999)
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.advance(0.001)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow() is True
    assert breaker.allow() is False  # the probe is out; everyone else is refused
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow() and breaker.allow()


def test_breaker_failed_probe_reopens_and_restarts_the_timer() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=1)
    breaker.record_failure(ErrorKind.SERVER)
    clock.advance(45)  # well past reset_s
    assert breaker.allow()
    breaker.record_failure(ErrorKind.TIMEOUT)
    assert breaker.state is BreakerState.OPEN
    assert breaker.snapshot()["opened_at"] == clock.now
    clock.advance(29.9)
    assert breaker.state is BreakerState.OPEN
    clock.advance(0.1)
    assert breaker.state is BreakerState.HALF_OPEN and breaker.allow()


def test_breaker_probe_ending_in_client_error_frees_the_slot() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=1)
    breaker.record_failure(ErrorKind.SERVER)
    clock.advance(30)
    assert breaker.allow()
    breaker.record_failure(ErrorKind.CLIENT)  # no verdict on the service
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow()


def test_breaker_reports_each_change_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    changes: list[tuple[BreakerState, BreakerState]] = []
    breaker = make_breaker(
        clock, failure_threshold=2, on_change=lambda old, new: changes.append((old, new))
    )
    caplog.set_level(logging.INFO, logger="heimdall_edge.cloud.breaker")
    for _ in range(4):
        breaker.record_failure(ErrorKind.SERVER)
    clock.advance(30)
    for _ in range(3):
        assert breaker.state is BreakerState.HALF_OPEN
    breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    S = BreakerState
    assert changes == [(S.CLOSED, S.OPEN), (S.OPEN, S.HALF_OPEN), (S.HALF_OPEN, S.CLOSED)]
    messages = [r.getMessage() for r in caplog.records if r.name == "heimdall_edge.cloud.breaker"]
    assert len(messages) == 3
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO, logging.INFO]
    assert "svc: circuit breaker open for 30s (last error: server)" in messages[0]


def test_breaker_snapshot() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=2)
    assert breaker.snapshot() == {
        "service": "svc",
        "state": "closed",
        "failures_in_window": 0,
        "opened_at": None,
        "probe_in_s": None,
        "last_error": None,
    }
    breaker.record_failure(ErrorKind.TIMEOUT)
    breaker.record_failure(ErrorKind.TIMEOUT)
    clock.advance(10)
    assert breaker.snapshot() == {
        "service": "svc",
        "state": "open",
        "failures_in_window": 2,
        "opened_at": 1000.0,
        "probe_in_s": 20.0,
        "last_error": "timeout",
    }


# --- rate limit -----------------------------------------------------------------------------------


async def test_rate_limit_caps_concurrency() -> None:
    limit = RateLimit(requests_per_minute=600, concurrency=2)
    in_flight = peak = 0
    release = asyncio.Event()

    async def one() -> None:
        nonlocal in_flight, peak
        async with limit:
            in_flight += 1
            peak = max(peak, in_flight)
            await release.wait()
            in_flight -= 1

    async def scenario() -> None:
        tasks = [asyncio.create_task(one()) for _ in range(5)]
        for _ in range(10):
            await asyncio.sleep(0)
        assert in_flight == 2
        release.set()
        await asyncio.gather(*tasks)

    await asyncio.wait_for(scenario(), TIMEOUT)
    assert peak == 2


async def test_rate_limit_caps_requests_per_minute() -> None:
    limit = RateLimit(requests_per_minute=2, concurrency=10)

    async def one() -> None:
        async with limit:
            pass

    async def scenario() -> None:
        await one()
        await one()
        third = asyncio.create_task(one())
        for _ in range(10):
            await asyncio.sleep(0)
        assert not third.done()  # the burst of 2 is spent; the next slot is 30 s away
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third

    await asyncio.wait_for(scenario(), TIMEOUT)


async def test_rate_limit_cancelled_waiter_frees_its_slot() -> None:
    limit = RateLimit(requests_per_minute=1, concurrency=1)

    async def scenario() -> None:
        async with limit:
            pass
        waiter = asyncio.create_task(limit.__aenter__())  # holds the slot, waits for the rate
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not limit._slots.locked()

    await asyncio.wait_for(scenario(), TIMEOUT)


# --- call policy ----------------------------------------------------------------------------------


class Script:
    """fn(timeout_s) for a policy: raises or returns the scripted outcomes in order."""

    def __init__(
        self, *outcomes: object, clock: FakeClock | None = None, takes_s: float = 0.0
    ) -> None:
        self.outcomes = list(outcomes)
        self.timeouts: list[float] = []
        self.clock = clock
        self.takes_s = takes_s

    @property
    def calls(self) -> int:
        return len(self.timeouts)

    async def __call__(self, timeout_s: float) -> object:
        self.timeouts.append(timeout_s)
        if self.clock is not None:
            self.clock.advance(self.takes_s)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def make_policy(
    clock: FakeClock, breaker: CircuitBreaker | None = None, **kwargs: Any
) -> CallPolicy:
    options: dict[str, Any] = {"deadline_s": 10.0, "max_attempts": 2}
    return CallPolicy(
        "svc",
        breaker or make_breaker(clock),
        RateLimit(requests_per_minute=6000, concurrency=4),
        clock=clock,
        sleep=clock.sleep,
        **(options | kwargs),
    )


def run(coro: Awaitable[Any]) -> Awaitable[Any]:
    return asyncio.wait_for(coro, TIMEOUT)


def server_error() -> openai.APIStatusError:
    return openai_error(openai.InternalServerError, 503)


async def test_policy_success_gives_fn_the_whole_budget() -> None:
    clock = FakeClock()
    fn = Script("text")
    assert await run(make_policy(clock).call(fn)) == "text"
    assert fn.timeouts == [10.0]
    assert clock.sleeps == []


async def test_policy_retries_and_the_retry_gets_what_is_left() -> None:
    clock = FakeClock()
    fn = Script(server_error(), "text", clock=clock, takes_s=1.0)
    policy = make_policy(clock, backoff_base_s=0.2, backoff_max_s=2.0)
    assert await run(policy.call(fn)) == "text"
    assert fn.calls == 2
    assert len(clock.sleeps) == 1 and 0 <= clock.sleeps[0] <= 0.2
    assert fn.timeouts[1] == pytest.approx(10.0 - 1.0 - clock.sleeps[0])


async def test_policy_honours_retry_after() -> None:
    clock = FakeClock()
    fn = Script(openai_error(openai.RateLimitError, 429, {"retry-after": "2"}), "text")
    assert await run(make_policy(clock).call(fn)) == "text"
    assert fn.calls == 2
    assert clock.sleeps and clock.sleeps[0] >= 2.0


async def test_policy_fails_fast_when_retry_after_exceeds_the_deadline() -> None:
    clock = FakeClock()
    fn = Script(openai_error(openai.RateLimitError, 429, {"retry-after": "30"}), "text")
    with pytest.raises(CloudError) as caught:
        await run(make_policy(clock, deadline_s=10.0, max_attempts=5).call(fn))
    assert (caught.value.kind, caught.value.retry_after_s) == (ErrorKind.RATE_LIMIT, 30.0)
    assert fn.calls == 1
    assert clock.sleeps == []  # no waiting for an answer that would come too late
    assert clock.now == 1000.0


async def test_policy_does_not_retry_when_too_little_time_is_left() -> None:
    clock = FakeClock()
    fn = Script(server_error(), "text", clock=clock, takes_s=9.6)  # 0.4 s left < min_attempt_s
    with pytest.raises(CloudError) as caught:
        await run(make_policy(clock, deadline_s=10.0, max_attempts=3, min_attempt_s=0.5).call(fn))
    assert caught.value.kind is ErrorKind.SERVER
    assert fn.calls == 1


async def test_policy_stops_at_max_attempts() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=100)
    fn = Script(server_error())
    with pytest.raises(CloudError) as caught:
        await run(
            make_policy(clock, breaker, max_attempts=3, backoff_base_s=0.2, backoff_max_s=0.3).call(
                fn
            )
        )
    assert (caught.value.kind, caught.value.status) == (ErrorKind.SERVER, 503)
    assert fn.calls == 3
    assert len(clock.sleeps) == 2 and all(0 <= s <= 0.3 for s in clock.sleeps)
    assert breaker.snapshot()["failures_in_window"] == 3  # every attempt was recorded


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (openai_error(openai.AuthenticationError, 401), ErrorKind.AUTH),
        (openai_error(openai.BadRequestError, 400), ErrorKind.CLIENT),
        (ValueError("transcription response has no text"), ErrorKind.MALFORMED),
        (eleven_error(200, body="<html>"), ErrorKind.MALFORMED),
    ],
    ids=["auth", "client", "malformed", "malformed-eleven"],
)
async def test_policy_never_retries_auth_client_malformed(
    exc: BaseException, kind: ErrorKind
) -> None:
    clock = FakeClock()
    fn = Script(exc, "text")
    with pytest.raises(CloudError) as caught:
        await run(make_policy(clock, max_attempts=5).call(fn))
    assert caught.value.kind is kind
    assert caught.value.__cause__ is exc  # the journal gets the chain
    assert fn.calls == 1 and clock.sleeps == []


async def test_policy_auth_failure_opens_the_breaker_and_later_calls_skip() -> None:
    clock = FakeClock()
    policy = make_policy(clock)
    with pytest.raises(CloudError):
        await run(policy.call(Script(openai_error(openai.AuthenticationError, 401))))
    fn = Script("text")
    with pytest.raises(CloudError) as caught:
        await run(policy.call(fn))
    assert caught.value.kind is ErrorKind.BREAKER_OPEN
    assert fn.calls == 0


async def test_policy_stops_retrying_once_the_breaker_opens() -> None:
    clock = FakeClock()
    fn = Script(server_error())
    policy = make_policy(clock, make_breaker(clock, failure_threshold=2), max_attempts=5)
    with pytest.raises(CloudError) as caught:
        await run(policy.call(fn))
    assert caught.value.kind is ErrorKind.SERVER  # the real reason, not BREAKER_OPEN
    assert fn.calls == 2
    assert policy.breaker.state is BreakerState.OPEN


async def test_policy_deadline_bounds_the_whole_call() -> None:
    """A real 50 ms deadline: asyncio.timeout cuts a request that never answers."""
    clock = FakeClock()
    breaker = make_breaker(clock)
    policy = CallPolicy(
        "svc", breaker, RateLimit(6000, 4), deadline_s=0.05, clock=clock, sleep=clock.sleep
    )

    async def hangs(timeout_s: float) -> str:
        await asyncio.Event().wait()
        return "never"

    with pytest.raises(CloudError) as caught:
        await run(policy.call(hangs))
    assert caught.value.kind is ErrorKind.SLOW
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert breaker.snapshot()["failures_in_window"] == 1  # a slow service is a failing one


async def test_policy_deadline_overrun_fails_the_service_not_the_network() -> None:
    clock = FakeClock()

    async def probe() -> bool:
        raise AssertionError("an overrun deadline must not send connectivity probing")

    connectivity = Connectivity(
        probe, service="svc", offline_after=1, clock=clock, sleep=clock.sleep
    )
    breaker = make_breaker(clock, failure_threshold=2)
    policy = CallPolicy(
        "svc",
        breaker,
        RateLimit(6000, 4),
        deadline_s=0.02,
        clock=clock,
        sleep=clock.sleep,
        connectivity=connectivity,
    )

    async def hangs(timeout_s: float) -> str:
        await asyncio.Event().wait()
        return "never"

    for _ in range(2):
        with pytest.raises(CloudError):
            await run(policy.call(hangs))
    assert connectivity.online and connectivity.snapshot()["consecutive_failures"] == 0
    assert breaker.state is BreakerState.OPEN and breaker.snapshot()["last_error"] == "slow"
    assert policy.stats["failed"] == 2


def test_latency_norm_tells_far_slower_from_jitter_and_follows_a_new_pace() -> None:
    norm = LatencyNorm(factor=3.0, margin_s=1.0, window=10, min_samples=5)
    assert not any(norm.observe(s) for s in (0.5, 0.6, 0.4, 0.5, 0.5))  # learning: never slow
    assert norm.normal_s == 0.5
    assert not norm.observe(1.4)  # under 3x and under normal + 1 s: jitter
    assert norm.observe(2.0)  # 4x and 1.5 s more: far slower
    fast = LatencyNorm(factor=3.0, margin_s=1.0, min_samples=1)
    fast.observe(0.05)
    assert not fast.observe(0.9)  # 18x, but under the margin: a fast service's jitter
    settled = [norm.observe(3.0) for _ in range(10)]
    assert settled[0] and not settled[-1]  # a service that stays at 3 s is its new normal


async def test_policy_far_slower_answers_open_the_breaker_and_are_still_returned() -> None:
    clock = FakeClock()
    connectivity = Connectivity(
        lambda: asyncio.sleep(0, True),
        service="svc",
        offline_after=1,
        clock=clock,
        sleep=clock.sleep,
    )
    breaker = make_breaker(clock, failure_threshold=3)
    policy = make_policy(
        clock,
        breaker,
        connectivity=connectivity,
        norm=LatencyNorm(factor=3.0, margin_s=1.0, min_samples=5),
    )
    for _ in range(5):
        assert await run(policy.call(Script("fast", clock=clock, takes_s=0.3))) == "fast"
    assert breaker.state is BreakerState.CLOSED
    for _ in range(3):  # the answer still serves this call; the breaker learns for the next
        assert await run(policy.call(Script("late", clock=clock, takes_s=2.5))) == "late"
    assert breaker.state is BreakerState.OPEN and breaker.snapshot()["last_error"] == "slow"
    assert connectivity.online  # it answered: the network is fine
    assert policy.stats["slow"] == 3 and policy.stats["answered"] == 5
    with pytest.raises(CloudError) as caught:
        await run(policy.call(Script("skipped")))
    assert caught.value.kind is ErrorKind.BREAKER_OPEN and policy.stats["skipped"] == 1


async def test_policy_lost_hedges_reported_by_the_caller_open_the_breaker() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=3, reset_s=30.0)
    policy = make_policy(clock, breaker)
    for turn in range(3):
        policy.record_slow(f"turn {turn}: lost its hedge")
    assert breaker.state is BreakerState.OPEN
    clock.advance(30.0)  # half-open: one probe, still slow (lost its hedge again)
    assert breaker.allow()
    policy.record_slow("the probe lost its hedge")
    assert breaker.state is BreakerState.OPEN
    clock.advance(30.0)  # fast again: the probe answers at its normal pace and closes it
    assert await run(policy.call(Script("fast", clock=clock, takes_s=0.2))) == "fast"
    assert breaker.state is BreakerState.CLOSED


async def test_policy_offline_short_circuits_with_zero_calls() -> None:
    clock = FakeClock()

    async def never() -> bool:
        raise AssertionError("not probed here")

    connectivity = Connectivity(never, service="svc", clock=clock, sleep=clock.sleep)
    connectivity.record_failure(ErrorKind.CONNECTION)
    connectivity.record_failure(ErrorKind.CONNECTION)
    breaker = make_breaker(clock)
    fn = Script("text")
    with pytest.raises(CloudError) as caught:
        await run(make_policy(clock, breaker, connectivity=connectivity).call(fn))
    assert caught.value.kind is ErrorKind.OFFLINE
    assert fn.calls == 0
    assert breaker.snapshot()["failures_in_window"] == 0 and clock.now == 1000.0


async def test_policy_feeds_connectivity() -> None:
    clock = FakeClock()

    async def probe() -> bool:
        return True

    connectivity = Connectivity(
        probe, service="svc", offline_after=2, clock=clock, sleep=clock.sleep
    )
    policy = make_policy(
        clock, make_breaker(clock, failure_threshold=100), max_attempts=2, connectivity=connectivity
    )
    fn = Script(httpx.ConnectError("refused"))
    with pytest.raises(CloudError) as caught:
        await run(policy.call(fn))
    assert caught.value.kind is ErrorKind.CONNECTION and fn.calls == 2
    assert connectivity.online is False
    connectivity.record_success()  # e.g. the probe
    assert await run(policy.call(Script("text"))) == "text"
    assert connectivity.snapshot()["consecutive_failures"] == 0


async def test_policy_cancellation_is_not_a_failure() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=1)
    policy = make_policy(clock, breaker)
    started = asyncio.Event()

    async def slow(timeout_s: float) -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    async def scenario() -> None:
        task = asyncio.create_task(policy.call(slow))
        await started.wait()
        task.cancel()  # the local engine won the hedge
        with pytest.raises(asyncio.CancelledError):
            await task

    await run(scenario())
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot()["failures_in_window"] == 0
    assert policy.stats["cancelled"] == 1 and policy.stats["failed"] == 0


async def test_policy_half_open_lets_one_of_two_concurrent_callers_probe() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=1)
    policy = make_policy(clock, breaker)
    breaker.record_failure(ErrorKind.SERVER)
    clock.advance(30)
    entered = asyncio.Event()
    answer = asyncio.Event()
    calls = 0

    async def probe_call(timeout_s: float) -> str:
        nonlocal calls
        calls += 1
        entered.set()
        await answer.wait()
        return "text"

    async def scenario() -> None:
        first = asyncio.create_task(policy.call(probe_call))
        await entered.wait()
        second = asyncio.create_task(policy.call(probe_call))
        with pytest.raises(CloudError) as caught:
            await second
        assert caught.value.kind is ErrorKind.BREAKER_OPEN
        answer.set()
        assert await first == "text"

    await run(scenario())
    assert calls == 1
    assert breaker.state is BreakerState.CLOSED


async def test_policy_failed_probe_reopens_without_retrying() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=1)
    breaker.record_failure(ErrorKind.SERVER)
    clock.advance(30)
    fn = Script(server_error(), "text")
    with pytest.raises(CloudError) as caught:
        await run(make_policy(clock, breaker, max_attempts=3).call(fn))
    assert caught.value.kind is ErrorKind.SERVER
    assert fn.calls == 1
    assert breaker.state is BreakerState.OPEN


async def test_policy_cancelled_probe_releases_the_slot() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock, failure_threshold=1)
    policy = make_policy(clock, breaker)
    breaker.record_failure(ErrorKind.SERVER)
    clock.advance(30)
    started = asyncio.Event()

    async def slow(timeout_s: float) -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    async def scenario() -> None:
        task = asyncio.create_task(policy.call(slow))
        await started.wait()
        assert not breaker.allow()  # the probe slot is taken
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert breaker.state is BreakerState.HALF_OPEN
        assert await policy.call(Script("text")) == "text"

    await run(scenario())
    assert breaker.state is BreakerState.CLOSED


async def test_policy_respects_the_rate_limit_concurrency() -> None:
    clock = FakeClock()
    policy = CallPolicy(
        "svc",
        make_breaker(clock),
        RateLimit(6000, concurrency=1),
        deadline_s=10,
        clock=clock,
        sleep=clock.sleep,
    )
    in_flight = peak = 0

    async def fn(timeout_s: float) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        for _ in range(3):
            await asyncio.sleep(0)
        in_flight -= 1
        return "ok"

    results = await run(asyncio.gather(*(policy.call(fn) for _ in range(4))))
    assert results == ["ok"] * 4 and peak == 1


async def test_policy_logs_no_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    policy = make_policy(clock, max_attempts=3)
    fn = Script(
        openai_error(openai.RateLimitError, 429, {"retry-after": "1"}, {"message": SECRET}),
        openai_error(openai.AuthenticationError, 401, body={"message": SECRET}),
    )
    with pytest.raises(CloudError):
        await run(policy.call(fn))
    assert fn.calls == 2
    assert "svc: rate_limit (HTTP 429)" in caplog.text and "svc: auth (HTTP 401)" in caplog.text
    assert SECRET not in caplog.text and "Bearer" not in caplog.text


async def test_policy_available_and_failures_reported_from_outside() -> None:
    clock = FakeClock()

    async def probe() -> bool:
        return True

    connectivity = Connectivity(
        probe, service="svc", offline_after=1, clock=clock, sleep=clock.sleep
    )
    breaker = make_breaker(clock, failure_threshold=1)
    policy = make_policy(clock, breaker, connectivity=connectivity)
    assert policy.available()
    # A stream that broke after its first chunk: counted by whoever was reading it.
    policy.record_failure(classify(httpx.ReadError("reset"), "svc", mid_stream=True))
    assert breaker.state is BreakerState.OPEN and connectivity.online
    assert not policy.available()
    clock.advance(30)
    assert policy.available()  # half-open: worth a probe, and asking claims nothing
    assert breaker.allow()
    policy.record_failure(CloudError("svc", ErrorKind.CONNECTION))
    assert not connectivity.online and not policy.available()
