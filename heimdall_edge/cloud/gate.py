"""The breaker gate: ask the breaker, run one attempt, tell the breaker and connectivity how it went.

Every cloud caller goes through one, the speech and reply services (inside their
CallPolicy) and the capture store alike, so the half-open probe slot, the verdicts and
what connectivity learns follow one rule everywhere. Each service keeps its own
breaker, settings and connectivity; only this code path is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING, Any

from heimdall_edge.cloud.breaker import BreakerState, CircuitBreaker
from heimdall_edge.cloud.errors import CloudError, ErrorKind

if TYPE_CHECKING:
    from heimdall_edge.cloud.connectivity import Connectivity


class Attempt:
    """One call the breaker let through. Ending without a verdict (cancelled, or an error
    that says nothing about the service) hands a half-open breaker's probe slot back."""

    def __init__(self, gate: BreakerGate) -> None:
        self._gate = gate
        self.settled = False

    def answered(self, *, slow: bool = False) -> None:
        self._gate.record_answer(slow=slow)
        self.settled = True

    def failed(self, error: CloudError) -> None:
        self._gate.record_failure(error)
        self.settled = True


class BreakerGate:
    """One service's breaker and connectivity, asked before and told after every call.

    `other_hosts` names services reached on the way that are not this one (the IoT
    credentials provider before the store): their failures count for the breaker, but
    say nothing about the way to this service, so connectivity is not told.
    `when_open` ends the message of the BREAKER_OPEN error a refused call raises.
    """

    def __init__(
        self,
        service: str,
        breaker: CircuitBreaker,
        connectivity: Connectivity | None = None,
        *,
        other_hosts: Collection[str] = (),
        when_open: str = "call skipped",
    ) -> None:
        self.service = service
        self.breaker = breaker
        self.connectivity = connectivity
        self._other_hosts = frozenset(other_hosts)
        self._when_open = when_open

    def refusal(self) -> CloudError:
        """The error of a call the open breaker does not let through."""
        return CloudError(
            self.service, ErrorKind.BREAKER_OPEN, f"circuit breaker open; {self._when_open}"
        )

    @contextlib.contextmanager
    def attempt(self) -> Iterator[Attempt]:
        """Let one call through, or raise the refusal; the caller gives the verdict."""
        probing = self.breaker.state is BreakerState.HALF_OPEN
        if not self.breaker.allow():
            raise self.refusal()
        attempt = Attempt(self)
        try:
            yield attempt
        finally:
            if probing and not attempt.settled:
                self.breaker.release_probe()

    async def call_in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One blocking call (boto3, say) in a worker thread, through the gate.

        Its CloudErrors are the verdict; any other exception (an OSError reading a
        file) says nothing about the service and propagates without one.
        """
        with self.attempt() as attempt:
            try:
                result = await asyncio.to_thread(fn, *args, **kwargs)
            except CloudError as error:
                attempt.failed(error)
                raise
            attempt.answered()
            return result

    def record_answer(self, *, slow: bool = False) -> None:
        """The service answered, so the way there works; one far slower than usual still
        fails the service."""
        if slow:
            self.breaker.record_failure(ErrorKind.SLOW)
        else:
            self.breaker.record_success()
        if self.connectivity is not None:
            self.connectivity.record_success()

    def record_failure(self, error: CloudError) -> None:
        """A failure, seen in a call or outside one (a stream that broke after its start)."""
        self.breaker.record_failure(error.kind)
        if self.connectivity is not None and error.service not in self._other_hosts:
            self.connectivity.record_failure(error.kind)
